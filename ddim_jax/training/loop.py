"""The training loop: check everything, lock the workdir, resume, step, log, checkpoint, export.

Nothing in the workdir is written before the config is validated, the data is opened, the step is
compiled and found to fit in the device's memory (:mod:`ddim_jax.training.memory`), and the
checkpoints are checked against the config; ``config.json`` is then written atomically. One
process at a time may train in a workdir (:class:`ddim_jax.files.WorkdirLock`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import threading
import time

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors import SafetensorError

from ddim_jax import data as data_lib
from ddim_jax import files, models
from ddim_jax.config import config_differences, mesh_shape, to_dict
from ddim_jax.images import save_grid
from ddim_jax.parallel import gather_host_tree, host, on_main, train_mesh
from ddim_jax.training import adapters, finetune, latent
from ddim_jax.training import run as run_lib
from ddim_jax.training.checkpoints import Checkpointer, resume
from ddim_jax.training.memory import check_fits, memory_plan
from ddim_jax.training.metrics import METRICS, MetricsWriter, due
from ddim_jax.training.state import TrainState, cached_train_step, init_state

log = logging.getLogger("ddim_jax")


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    steps_run: int
    wall_time: float
    images_per_sec: float
    preempted: bool


class _Stop:
    """SIGTERM (preemption) and Ctrl-C (SIGINT): the loop saves a checkpoint after the current step and
    returns. A second Ctrl-C stops at once (KeyboardInterrupt), without that checkpoint."""

    def __init__(self):
        self.signal = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def __call__(self, signum, frame):
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.warning("received %s: saving a checkpoint and exiting%s", signal.Signals(signum).name,
                    " (Ctrl-C again to stop at once, without it)" if signum == signal.SIGINT else "")
        self.signal = signum


def check_batch_fits(config, num_processes: int) -> None:
    """Refuses a global batch whose per-process host buffers (uint8 images and their float32 copy
    for one dispatch) exceed the memory available now."""
    t, d = config.training, config.data
    need = t.steps_per_dispatch * (t.batch_size // max(num_processes, 1)) * d.image_size ** 2 * d.channels * 5
    have = files.available_memory()
    if need > have:
        raise ValueError(f"training.batch_size={t.batch_size} needs {need / 2**30:.1f} GiB of host memory per "
                         f"process for one batch of {d.image_size}x{d.image_size}x{d.channels} images; "
                         f"{have / 2**30:.1f} GiB are available")


def check_labels(config, source) -> None:
    """A class-conditional config needs a labelled dataset with exactly ``model.num_classes`` classes."""
    k = config.model.get("num_classes")
    if k is None:
        return
    if source.num_classes is None:
        raise ValueError(f"model.num_classes={k} needs class labels, and dataset {source.name!r} has none "
                         "(a folder dataset is labelled by its sub-folders); set model.num_classes=None")
    if source.num_classes != k:
        raise ValueError(f"model.num_classes={k} but dataset {source.name!r} has {source.num_classes} classes "
                         f"({', '.join(source.class_names[:12])}); set model.num_classes={source.num_classes}")


def train(config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False,
          progress: bool = True, devices=None) -> TrainResult:
    """Trains (or resumes) the run in ``workdir`` on ``devices`` (default: all), on the mesh
    ``training.mesh``; returns when ``training.num_steps`` are done, after a SIGTERM (having saved), or
    raises after ``max_nonfinite`` non-finite losses in a row."""
    devices = jax.devices() if devices is None else list(devices)
    # The config resolved once: its autoencoder or LPIPS weights read, validated, its spec and objective built.
    run = run_lib.resolve(config, workdir, num_devices=len(devices), num_processes=jax.process_count())
    mesh = train_mesh(devices, mesh_shape(run.config.training.mesh, len(devices)))
    check_batch_fits(run.config, jax.process_count())
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    lock = on_main(lambda: files.WorkdirLock(workdir).acquire(), "locking the workdir")
    try:
        on_main(lambda: _remove_leftovers(workdir), "removing a killed run's temporary files")
        return _train_locked(run, workdir, mesh, is_main, allow_config_change, progress)
    finally:
        if lock is not None:
            lock.release()


# What files.atomic_write and files.replace_dir leave beside their targets when the process is killed.
_LEFTOVER = re.compile(rf"\.({re.escape(models.EXPORT_DIR)}|{re.escape(latent.COPY_DIR)}|config\.json|run\.json|"
                       rf"{re.escape(adapters.BASE_DIR)}|{re.escape(adapters.LORA_FILE)}|"
                       rf"{re.escape(METRICS)})\..+\.(tmp|old)")


def _remove_leftovers(workdir: str) -> None:
    """Removes the temporary copies of the workdir's own files that a killed run left (the lock, held now,
    says no other run is writing them). Unfinished checkpoints are :class:`Checkpointer`'s to remove."""
    for name in os.listdir(workdir):
        if _LEFTOVER.fullmatch(name):
            path = os.path.join(workdir, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)


def _train_locked(run, workdir, mesh, is_main, allow_config_change, progress) -> TrainResult:
    config, t_cfg = run.config, run.config.training
    source = data_lib.make_source(config.data)
    if len(source) < 1:
        raise ValueError(f"dataset {config.data.dataset!r} is empty")
    check_labels(config, source)
    if run.first_stage is not None and not run.record.scale_factor:
        run = run.with_scale(latent.estimate_scale(run.first_stage, source))
        if is_main:
            print(f"latent scale factor {run.record.scale_factor:.6g} (1 / std of the first training images' "
                  "latents)", flush=True)
    cfg_dict = to_dict(config)
    cfg_path = os.path.join(workdir, "config.json")
    ckpt = Checkpointer(workdir, t_cfg.keep_checkpoints)
    try:
        restored = resume(ckpt, run, mesh, allow_config_change=allow_config_change)
        if restored is None and os.path.exists(cfg_path) and not allow_config_change:
            # A run that stopped before its first checkpoint: its config.json and run.json are all there is
            # to compare.
            with open(cfg_path) as f:
                saved = json.load(f)
            diff = config_differences(saved, cfg_dict) + run.record.differences(_saved_record(workdir, saved))
            if diff:
                raise ValueError(f"workdir {workdir!r} holds a run with a different config ({', '.join(diff[:8])}); "
                                 "use another --workdir, or pass --override_config to continue with the new one")
        if restored is None:
            _refuse_to_replace_a_trained_model(workdir)
        # Compiles the step (the loop's calls reuse it) and refuses a run that cannot fit, before writing anything.
        plan = memory_plan(run, mesh, cached_train_step(run, mesh))
        if is_main:
            print(plan.summary(), flush=True)
        check_fits(plan, config)
        if restored is not None:
            state, meta = restored
            if is_main:
                print(f"resuming from step {meta['step']} in {ckpt.dir}", flush=True)
        else:
            state = init_state(run, mesh)
        if run.first_stage is not None:
            on_main(lambda: latent.save_copy(workdir, run.first_stage, run.record.scale_factor),
                    "copying the autoencoder")
        if run.start is not None and run.start.base is not None:
            on_main(lambda: finetune.save_base_copy(workdir, run.start), "copying the LoRA run's base model")
        on_main(lambda: files.write_json(os.path.join(workdir, run_lib.RECORD_FILE), run.record.to_dict()),
                "writing run.json")
        on_main(lambda: files.write_json(cfg_path, cfg_dict), "writing config.json")
        frozen = jax.device_put(run.frozen, NamedSharding(mesh, P()))  # what the step uses but does not train
        return _loop(run, workdir, mesh, is_main, progress, source, ckpt, state, frozen)
    finally:
        ckpt.wait()
        ckpt.close()


def _saved_record(workdir: str, saved_config: dict) -> "run_lib.Record":
    """The run record a run that stopped before its first checkpoint left: its run.json, or for a run from
    before records, what its config held."""
    path = os.path.join(workdir, run_lib.RECORD_FILE)
    if not os.path.exists(path):
        return run_lib.Record.of_saved({"config": saved_config})
    with open(path) as f:
        return run_lib.Record.from_dict(json.load(f))


def _refuse_to_replace_a_trained_model(workdir: str) -> None:
    """A workdir without checkpoints whose exported model was trained (its checkpoints were deleted or
    moved): starting over from step 0 would overwrite that model and cut back its metrics."""
    path = os.path.join(workdir, models.EXPORT_DIR)
    if models.is_model_dir(path):
        try:
            step = models.load(path)[0].info.get("step", 0)
        except (ValueError, OSError):
            step = "an unknown number of"
        raise RuntimeError(f"workdir {workdir!r} has no checkpoint to resume from but holds a model trained for "
                           f"{step} steps in {path}; training will not start over from step 0 there and replace it: "
                           "use a new --workdir")


def _loop(run, workdir, mesh, is_main, progress, source, ckpt, state, frozen) -> TrainResult:
    config, objective, spec = run.config, run.objective, run.spec
    t_cfg = config.training
    if is_main:
        print(objective.summary(), flush=True)
    cfg_dict = to_dict(config)
    start = int(host(state.step))
    train_step = cached_train_step(run, mesh)
    batch_sharding = train_step.batch_sharding
    k, last = t_cfg.steps_per_dispatch, t_cfg.num_steps
    conditional = spec.num_classes is not None

    writing = None  # (step, its EMA model, a LoRA run's EMA adapters, on the host) of the checkpoint being written
    # A LoRA run exports the merged model (workdir/model) and, for a kind with a diffusers counterpart, its
    # EMA adapters in diffusers' LoRA format beside it (workdir/lora.safetensors).
    lora = adapters.enabled(config)
    lora_file = lora and adapters.has_lora_format(spec)

    def checkpoint(step):
        nonlocal writing
        commit()
        ckpt.save(state, {"step": step, "data_position": step, "seed": t_cfg.seed,
                          "global_batch": t_cfg.batch_size, "config": cfg_dict, "record": run.record.to_dict()})
        # The EMA model on the host, assembled from its shards (the next step donates the state's buffers).
        writing = (step, gather_host_tree(objective.model_params(state.ema_params, frozen)),
                   gather_host_tree(state.ema_params) if lora else None)

    def commit():
        """Waits for the checkpoint being written; once it has committed, writes its checksums and exports
        its EMA model in the one model format (for sample.py and for sharing). A model is never exported
        from a checkpoint that may not exist."""
        nonlocal writing
        if writing is None:
            return
        (step, params, lora_params), writing = writing, None
        ckpt.wait()
        on_main(lambda: export(step, params, lora_params), "exporting the model")

    def export(step, params, lora_params):
        ckpt.seal(step)
        info = dict(spec.info, source=f"{os.path.abspath(workdir)} (step {step}, EMA params)", step=step)
        path = os.path.join(workdir, models.EXPORT_DIR)
        spec_at = getattr(objective, "spec_at", None)  # a progressive distillation's round's student
        try:
            models.save(path, dataclasses.replace(spec if spec_at is None else spec_at(step), info=info), params,
                        overwrite=True)
        except SafetensorError as e:  # safetensors' word for a failed write (a full disk, ...)
            raise OSError(f"writing the model to {path} failed: {e}") from None
        if lora_params is not None and lora_file:
            adapters.save_lora(os.path.join(workdir, adapters.LORA_FILE), spec, lora_params, objective.alpha)

    workers = config.data.num_workers if config.data.num_workers >= 0 else data_lib.usable_cores()
    loader = data_lib.BatchLoader(source, t_cfg.batch_size, t_cfg.seed, jax.process_index(), jax.process_count(),
                                  labelled=conditional, workers=workers, prefetch=config.data.prefetch)
    writer = MetricsWriter(workdir, start_step=start, total_steps=last, enabled=is_main, progress=progress)
    stop = _Stop()
    main_thread = threading.current_thread() is threading.main_thread()
    old_handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)} if main_thread else {}
    # Progressive distillation's rounds (ddim_jax.training.distill): each round's teacher is the previous
    # round's student, exported when the round ends (a resumed run reads it back).
    rounds = getattr(objective, "round_ends", None) is not None
    replicated = NamedSharding(mesh, P())
    if rounds:
        teacher = objective.teacher_at(start, workdir)
        if teacher is not None:
            frozen = dict(frozen, teacher=jax.device_put(teacher, replicated))
    t0 = time.time()
    step, pending, preempted = start, [], False
    last_log_time, last_log_step = t0, start
    try:
        while step < last:
            n = min(k, last - step)  # a shorter tail compiles once more
            rows = [loader(step + i) for i in range(n)]
            local = np.stack([r[0] for r in rows] if conditional else rows)
            images = jax.make_array_from_process_local_data(batch_sharding, local,
                                                            (n, t_cfg.batch_size) + local.shape[2:])
            labels = (jax.make_array_from_process_local_data(batch_sharding, np.stack([r[1] for r in rows]),
                                                             (n, t_cfg.batch_size)) if conditional else None)
            state, metrics = train_step(state, images, labels, frozen)
            if pending:  # one dispatch stays in flight; the bar shows the steps that have finished
                jax.block_until_ready(pending[-1][1])
                writer.completed(pending[-1][0])
            pending.append((n, metrics))
            step += n
            if due(step, t_cfg.log_every, last):
                m = [jax.tree.map(host, x) for _, x in pending]
                writer.completed(pending[-1][0])
                pending = []
                now = time.time()
                sps = (step - last_log_step) / max(now - last_log_time, 1e-9)
                last_log_time, last_log_step = now, step
                finite = np.concatenate([x["finite"] for x in m])
                means = {name: float(np.mean(np.concatenate([x[name] for x in m])[finite])) if finite.any()
                         else float("nan") for name in m[0] if name != "finite"}  # loss, grad_norm, the objective's
                writer.write({"step": step, **means, "steps_per_sec": sps,
                              "nonfinite_total": int(host(state.nonfinite_total))})
                commit()  # the last checkpoint, if it is still being written
                in_a_row = int(host(state.nonfinite_in_a_row))
                if in_a_row >= t_cfg.max_nonfinite:
                    saved = ckpt.steps()
                    raise FloatingPointError(
                        f"stopped at step {step}: {in_a_row} non-finite losses in a row (each update was skipped; "
                        f"parameters are still finite). Lower training.lr or check the data; "
                        + (f"the last checkpoint (step {saved[-1]}) in {ckpt.dir} is intact" if saved
                           else "no checkpoint was written yet"))
            if rounds and objective.round_ends(step):
                student = gather_host_tree(objective.model_params(state.ema_params, frozen))
                on_main(lambda: objective.export_round(step, student, workdir), "exporting the round's student")
                frozen = dict(frozen, teacher=jax.device_put(spec.network_params(student), replicated))
                if not due(step, t_cfg.checkpoint_every, last):
                    checkpoint(step)
            if due(step, t_cfg.checkpoint_every, last):
                checkpoint(step)
            if t_cfg.sample_every and due(step, t_cfg.sample_every, last):
                # On the training mesh: with fsdp > 1 the EMA params stay split as they are trained.
                imgs = objective.preview(objective.model_params(state.ema_params, frozen), mesh, source,
                                         t_cfg.num_sample_images, config)
                on_main(lambda: save_grid(imgs, os.path.join(workdir, "samples", f"step_{step:08d}.png"),
                                          scale=max(1, 64 // config.data.image_size)), "writing a sample grid")
            if _should_stop(stop.requested, step % t_cfg.log_every == 0):
                if not due(step, t_cfg.checkpoint_every, last):
                    checkpoint(step)
                preempted = True
                break
        commit()
    finally:
        loader.close()
        writer.close()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    wall = time.time() - t0
    ips = (step - start) * t_cfg.batch_size / max(wall, 1e-9)
    if is_main:
        how = {signal.SIGINT: "interrupted", signal.SIGTERM: "preempted"}.get(stop.signal, "preempted")
        print(f"{how if preempted else 'done'}: step {step} ({step - start} this run) in {wall:.1f} s, "
              f"{ips:.1f} images/s, {int(host(state.nonfinite_total))} non-finite steps skipped; workdir {workdir}",
              flush=True)
    return TrainResult(state, step - start, wall, ips, preempted)


def _should_stop(local: bool, sync_point: bool) -> bool:
    """Whether any process was asked to stop. With several processes they must all decide alike, so
    they compare flags only at ``sync_point`` steps (the logging steps)."""
    if jax.process_count() == 1:
        return local
    if not sync_point:
        return False
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(local))))
