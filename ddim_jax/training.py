"""Data-parallel training: the per-device step, the state, checkpoints and the loop.

The step is written pmap-style: a per-device function sees its rows of the global batch, computes
gradients, averages gradients and metrics with ``lax.pmean`` over the ``'data'`` mesh axis, and
applies the update to replicated parameters. It runs under ``jax.jit(jax.shard_map(...))`` on a
1-D mesh of every device of every host (the form JAX recommends now that ``jax.pmap`` is in
maintenance mode). Randomness is stateless: example ``i`` of the global batch at step ``s`` draws
its timestep, noise and flip from ``fold_in(fold_in(key(seed), s), i)``, so the losses do not
depend on how many devices or hosts share the batch, and a resumed run draws what an uninterrupted
one would. (Dropout masks are drawn per device and do depend on the layout.)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddim_jax import data as data_lib
from ddim_jax.diffusion import PREDICTION_TYPES, per_example_loss
from ddim_jax.images import save_grid, to_uint8
from ddim_jax.sampling import ddim_sample
from ddim_jax.schedules import SCHEDULES, Schedule, make_schedule
from ddim_jax.unet import UNet, make_eps_fn

log = logging.getLogger("ddim_jax")

# Fields that may change when a run is resumed (extending training, logging cadence).
RESUMABLE_CHANGES = ("training.num_steps", "training.log_every", "training.sample_every",
                     "training.checkpoint_every", "training.keep_checkpoints", "data.data_dir")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32, steps taken (skipped non-finite ones included)
    params: Any
    ema_params: Any
    opt_state: Any
    nonfinite_in_a_row: jax.Array
    nonfinite_total: jax.Array


def make_model(config) -> UNet:
    m = config.model
    return UNet(ch=m.ch, out_ch=config.data.channels, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
                attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout, resamp_with_conv=m.resamp_with_conv)


def make_diffusion_schedule(config) -> Schedule:
    f = config.diffusion
    kw = {} if f.schedule == "cosine" else dict(beta_start=f.beta_start, beta_end=f.beta_end)
    return make_schedule(f.schedule, f.num_timesteps, **kw)


def make_optimizer(config) -> optax.GradientTransformation:
    """Adam with a linear warmup to ``lr``, after clipping the (device-averaged) gradient's global norm."""
    t = config.training
    warmup = max(t.warmup_steps, 1)

    def lr(count):  # update k (0-based) uses lr * min((k + 1) / warmup, 1): the first update is not zero
        return t.lr * jnp.minimum((count + 1) / warmup, 1.0)

    return optax.chain(optax.clip_by_global_norm(t.grad_clip), optax.adam(lr))


def make_mesh() -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))


def _init_fn(config, model, tx):
    size, ch = config.data.image_size, config.data.channels

    def init():
        x = jnp.zeros((1, size, size, ch), jnp.float32)
        params = model.init(jax.random.key(config.training.seed), x, jnp.zeros((1,), jnp.int32))["params"]
        z = jnp.zeros((), jnp.int32)
        return TrainState(step=z, params=params, ema_params=params, opt_state=tx.init(params),
                          nonfinite_in_a_row=z, nonfinite_total=z)

    return init


def init_state(config, model, tx, mesh) -> TrainState:
    """The initial state, created directly in its replicated sharding."""
    return jax.jit(_init_fn(config, model, tx), out_shardings=NamedSharding(mesh, P()))()


def make_train_step(config, model, tx, schedule: Schedule, mesh):
    """``(state, images) -> (state, metrics)``: ``images`` uint8 ``[k, global_batch, H, W, C]`` sharded over
    the batch axis, k = ``steps_per_dispatch`` steps scanned in one call; metrics have leading dim k."""
    t_cfg = config.training
    seed, decay, flip = t_cfg.seed, t_cfg.ema_decay, config.data.random_flip
    prediction_type = config.diffusion.prediction_type
    T = schedule.num_timesteps

    def one_step(state: TrainState, images):
        b = images.shape[0]
        device = jax.lax.axis_index("data")
        step_key = jax.random.fold_in(jax.random.key(seed), state.step)
        keys = jax.vmap(jax.random.fold_in, (None, 0))(step_key, device * b + jnp.arange(b))
        kt, kn, kf = (jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(keys) for i in range(3))
        x0 = images.astype(jnp.float32) / 127.5 - 1.0
        if flip:
            do_flip = jax.vmap(jax.random.bernoulli)(kf)
            x0 = jnp.where(do_flip[:, None, None, None], x0[:, :, ::-1], x0)
        t = jax.vmap(lambda k: jax.random.randint(k, (), 0, T, jnp.int32))(kt)
        noise = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], jnp.float32))(kn)
        dropout_key = jax.random.fold_in(jax.random.fold_in(step_key, 1 << 30), device)

        def loss_fn(params):
            def eps_fn(x, tt):
                return model.apply({"params": params}, x, tt, train=True, rngs={"dropout": dropout_key})

            return jnp.mean(per_example_loss(eps_fn, schedule, x0, t, noise, prediction_type=prediction_type))

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        grads, loss = jax.lax.pmean((grads, loss), "data")
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = TrainState(
            step=state.step + 1,
            params=keep(params, state.params),
            ema_params=keep(ema, state.ema_params),
            opt_state=keep(opt_state, state.opt_state),
            nonfinite_in_a_row=jnp.where(finite, 0, state.nonfinite_in_a_row + 1),
            nonfinite_total=state.nonfinite_total + jnp.where(finite, 0, 1),
        )
        return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}

    on_cpu = mesh.devices.flat[0].platform == "cpu"

    def per_device(state, images):
        if not on_cpu:
            return jax.lax.scan(one_step, state, images)
        # XLA:CPU computes convolution filter gradients ~60x slower inside a while loop (a scan of
        # length 1 included), so on CPU the k steps are unrolled into straight-line code.
        metrics = []
        for i in range(images.shape[0]):
            state, m = one_step(state, images[i])
            metrics.append(m)
        return state, jax.tree.map(lambda *xs: jnp.stack(xs), *metrics)

    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(None, "data")), out_specs=(P(), P()),
                            check_vma=False)
    return jax.jit(sharded, donate_argnums=0)


_STEP_CACHE: dict = {}


def _cached_train_step(config, mesh):
    """``make_train_step`` for this config, built once per process (so repeated ``train`` calls,
    e.g. resuming in a notebook or a test, reuse the compiled program)."""
    d = _flatten(config_to_dict(config))
    key = (json.dumps({k: v for k, v in d.items() if k not in RESUMABLE_CHANGES}, sort_keys=True),
           tuple(dev.id for dev in mesh.devices.flat))
    if key not in _STEP_CACHE:
        _STEP_CACHE[key] = make_train_step(config, make_model(config), make_optimizer(config),
                                           make_diffusion_schedule(config), mesh)
    return _STEP_CACHE[key]


# ---------------------------------------------------------------------------------------------
# Configuration bookkeeping.


def config_to_dict(config) -> dict:
    return json.loads(config.to_json())


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(saved: dict, given: dict) -> list[str]:
    """Dotted keys whose values differ, except the fields a resumed run may change."""
    a, b = _flatten(saved), _flatten(given)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES]


def validate_config(config):
    t = config.training
    n = jax.device_count()
    if t.batch_size % n:
        raise ValueError(f"training.batch_size ({t.batch_size}) must be divisible by the number of devices ({n})")
    if t.batch_size % jax.process_count():
        raise ValueError(f"training.batch_size ({t.batch_size}) must be divisible by the number of processes "
                         f"({jax.process_count()})")
    for name in ("num_steps", "steps_per_dispatch", "log_every", "checkpoint_every", "max_nonfinite"):
        if not isinstance(t[name], int) or t[name] < (0 if name == "num_steps" else 1):
            raise ValueError(f"training.{name} must be a positive integer; got {t[name]!r}")
    for name in ("log_every", "checkpoint_every"):
        if t[name] % t.steps_per_dispatch:
            raise ValueError(f"training.{name} ({t[name]}) must be a multiple of training.steps_per_dispatch "
                             f"({t.steps_per_dispatch})")
    f = config.diffusion
    if f.schedule not in SCHEDULES:
        raise ValueError(f"diffusion.schedule must be one of {', '.join(SCHEDULES)}; got {f.schedule!r}")
    if f.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"diffusion.prediction_type must be one of {', '.join(PREDICTION_TYPES)}; "
                         f"got {f.prediction_type!r}")
    if config.data.crop not in ("center", "celeba", "none"):
        raise ValueError(f"data.crop must be one of center, celeba, none; got {config.data.crop!r}")
    if t.sample_every and t.sample_every % t.steps_per_dispatch:
        raise ValueError(f"training.sample_every ({t.sample_every}) must be 0 or a multiple of "
                         f"training.steps_per_dispatch ({t.steps_per_dispatch})")


# ---------------------------------------------------------------------------------------------
# Checkpoints.


class Checkpointer:
    """Orbax CheckpointManager over ``workdir/checkpoints``: state + JSON metadata (config, data position)."""

    def __init__(self, workdir: str, keep: int):
        self.dir = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.last_error = None
        self.manager = ocp.CheckpointManager(
            self.dir, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                           enable_async_checkpointing=True))

    def save(self, state: TrainState, meta: dict):
        if not _host(_all_finite((state.params, state.ema_params))):
            raise FloatingPointError(f"refusing to save a checkpoint with non-finite parameters at step {meta['step']}")
        self.manager.save(meta["step"], args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                 meta=ocp.args.JsonSave(meta)), force=True)

    def restore_latest(self, abstract_state, *, step: int | None = None, move_aside: bool = True,
                       architecture: dict | None = None):
        """(state, meta) from the newest readable checkpoint (or the given ``step``), or None.

        Unreadable checkpoints are skipped with a warning and, with ``move_aside``, moved to
        ``workdir/corrupt_checkpoints/`` so that a later save of the same step cannot collide with them.
        ``architecture`` (see :func:`architecture_of`) is compared with the one recorded in each
        checkpoint's metadata before any array is read: a mismatch is a ValueError, not corruption.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(f"no checkpoint for step {step} in {self.dir} (have: {sorted(steps)})")
            steps = [step]
        for step in steps:
            try:
                meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
                saved = architecture_of(meta["config"])
                if architecture is not None and saved != architecture:
                    raise _ArchitectureMismatch(f"checkpoint {step} in {self.dir} holds a model of another "
                                                f"architecture ({_diff_keys(saved, architecture)})")
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
                return out.state, out.meta
            except _ArchitectureMismatch as e:
                raise ValueError(str(e)) from None
            except Exception as e:  # noqa: BLE001 -- any failure to read means: try the previous one
                self.last_error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
                aside = os.path.join(os.path.dirname(self.dir), "corrupt_checkpoints", str(step))
                log.warning("checkpoint %d is unreadable (%s: %s); %s, trying the previous one", step,
                            type(e).__name__, (str(e).splitlines() or [""])[0][:200],
                            f"moved to {aside}" if move_aside else "skipped")
                if not move_aside:
                    continue
                if jax.process_index() == 0:
                    os.makedirs(os.path.dirname(aside), exist_ok=True)
                    shutil.move(os.path.join(self.dir, str(step)), aside)
                self.manager.reload()
        return None

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


class _ArchitectureMismatch(Exception):
    pass


def architecture_of(config) -> dict:
    """What fixes the shapes of the train state: the model block and the image size and channels."""
    d = config if isinstance(config, dict) else config_to_dict(config)
    return json.loads(json.dumps({"model": d["model"], "image_size": d["data"]["image_size"],
                                  "channels": d["data"]["channels"]}))


def _diff_keys(a: dict, b: dict) -> str:
    fa, fb = _flatten(a), _flatten(b)
    return ", ".join(f"{k}: {fa.get(k)!r} vs {fb.get(k)!r}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k))


def abstract_state(config, mesh) -> TrainState:
    """Shapes, dtypes and (replicated) shardings of the train state, without computing it."""
    shapes = jax.eval_shape(_init_fn(config, make_model(config), make_optimizer(config)))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, P())), shapes)


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"workdir {workdir!r} has no config.json: not a training run directory")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_checkpoint(workdir: str, step: int | None = None):
    """``(config, state, meta)`` of the newest readable checkpoint (or ``step``) of a training run,
    replicated over this process's devices. Nothing on disk is changed."""
    config = load_config(workdir)
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(f"workdir {workdir!r} has no checkpoints/ directory")
    ckpt = Checkpointer(workdir, keep=1_000_000)
    try:
        have = ckpt.manager.all_steps()
        out = ckpt.restore_latest(abstract_state(config, make_mesh()), step=step, move_aside=False,
                                  architecture=architecture_of(config))
    finally:
        ckpt.close()
    if out is None and not have:
        raise FileNotFoundError(f"no checkpoint in {ckpt.dir}")
    if out is None:
        raise ValueError(f"no checkpoint in {ckpt.dir} could be restored with the model in config.json "
                         f"(newest error: {ckpt.last_error})")
    return config, out[0], out[1]


# ---------------------------------------------------------------------------------------------
# Samples.


def sample_images(config, model, params, schedule, num: int, key, mesh, num_steps: int) -> np.ndarray:
    """``num`` uint8 samples by DDIM (eta = 0) from ``params``, the batch sharded over the mesh."""
    n_dev = mesh.devices.size
    padded = -(-num // n_dev) * n_dev
    shape = (padded, config.data.image_size, config.data.image_size, config.data.channels)
    x_T = jax.jit(lambda k: jax.random.normal(k, shape), out_shardings=NamedSharding(mesh, P("data")))(key)
    x0 = ddim_sample(make_eps_fn(model, params), schedule, x_T, num_steps, clip_x0=1.0)
    x0 = jax.experimental.multihost_utils.process_allgather(x0, tiled=True)
    return to_uint8(np.asarray(x0)[:num])


# ---------------------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    steps_run: int
    wall_time: float
    images_per_sec: float
    preempted: bool


class _Stop:
    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        log.warning("received signal %d: saving a checkpoint and exiting", signum)
        self.requested = True


def train(config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False,
          progress: bool = True) -> TrainResult:
    """Trains (or resumes) the run in ``workdir``; returns when ``training.num_steps`` are done,
    after a SIGTERM (having saved), or raises after ``max_nonfinite`` non-finite losses in a row."""
    import jax.experimental.multihost_utils  # noqa: F401  (process_allgather)
    from tqdm.auto import tqdm

    validate_config(config)
    t_cfg = config.training
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    cfg_dict = config_to_dict(config)
    cfg_path = os.path.join(workdir, "config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            saved = json.load(f)
        diff = config_differences(saved, cfg_dict)
        if diff and not allow_config_change:
            raise ValueError(f"workdir {workdir!r} holds a run with a different config ({', '.join(diff[:8])}); "
                             "use another --workdir, or pass --override_config to continue with the new one")
    if is_main:
        with open(cfg_path + ".tmp", "w") as f:
            json.dump(cfg_dict, f, indent=2)
        os.replace(cfg_path + ".tmp", cfg_path)

    mesh = make_mesh()
    model, tx, schedule = make_model(config), make_optimizer(config), make_diffusion_schedule(config)
    source = data_lib.make_source(config.data)
    if len(source) < 1:
        raise ValueError(f"dataset {config.data.dataset!r} is empty")
    state = init_state(config, model, tx, mesh)
    ckpt = Checkpointer(workdir, t_cfg.keep_checkpoints)
    restored = ckpt.restore_latest(abstract_state(config, mesh), architecture=architecture_of(config))
    if restored is not None:
        state, meta = restored
        if is_main:
            print(f"resuming from step {meta['step']} in {ckpt.dir}", flush=True)
    start = int(_host(state.step))
    train_step = _cached_train_step(config, mesh)
    batch_sharding = NamedSharding(mesh, P(None, "data"))
    k = t_cfg.steps_per_dispatch
    meta = lambda step: {"step": step, "data_position": step, "seed": t_cfg.seed,  # noqa: E731
                         "global_batch": t_cfg.batch_size, "config": cfg_dict}

    writer = None
    if is_main:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
        metrics_file = open(os.path.join(workdir, "metrics.jsonl"), "a")
    stop = _Stop()
    old_handler = signal.signal(signal.SIGTERM, stop) if _in_main_thread() else None
    bar = tqdm(total=t_cfg.num_steps, initial=start, disable=not (progress and is_main), unit="step",
               dynamic_ncols=True, desc="train")
    t0 = time.time()
    step, pending, preempted = start, [], False
    last_log_time, last_log_step = t0, start
    try:
        while step < t_cfg.num_steps:
            n = min(k, t_cfg.num_steps - step)  # a shorter tail compiles once more
            local = np.stack([data_lib.process_batch(source, t_cfg.batch_size, step + i, t_cfg.seed,
                                                     jax.process_index(), jax.process_count()) for i in range(n)])
            images = jax.make_array_from_process_local_data(batch_sharding, local,
                                                            (n, t_cfg.batch_size) + local.shape[2:])
            state, metrics = train_step(state, images)
            pending.append(metrics)
            step += n
            bar.update(n)
            if step % t_cfg.log_every == 0 or step == t_cfg.num_steps:
                m = jax.tree.map(_host, pending)
                pending = []
                now = time.time()
                sps = (step - last_log_step) / max(now - last_log_time, 1e-9)
                last_log_time, last_log_step = now, step
                losses = np.concatenate([x["loss"] for x in m])
                finite = np.concatenate([x["finite"] for x in m])
                row = {"step": step, "loss": float(np.mean(losses[finite])) if finite.any() else float("nan"),
                       "grad_norm": float(np.mean(np.concatenate([x["grad_norm"] for x in m])[finite]))
                       if finite.any() else float("nan"),
                       "steps_per_sec": sps, "nonfinite_total": int(_host(state.nonfinite_total))}
                bar.set_postfix(loss=f"{row['loss']:.4f}", steps_s=f"{sps:.2f}")
                if is_main:
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                    for key_, v in row.items():
                        if key_ != "step":
                            writer.add_scalar(key_, v, step)
                in_a_row = int(_host(state.nonfinite_in_a_row))
                if in_a_row >= t_cfg.max_nonfinite:
                    raise FloatingPointError(
                        f"stopped at step {step}: {in_a_row} non-finite losses in a row "
                        f"(each update was skipped; parameters are still finite). Lower training.lr or check "
                        f"the data; the last checkpoint in {ckpt.dir} is intact")
            if step % t_cfg.checkpoint_every == 0 or step == t_cfg.num_steps:
                ckpt.save(state, meta(step))
            if t_cfg.sample_every and (step % t_cfg.sample_every == 0 or step == t_cfg.num_steps):
                imgs = sample_images(config, model, state.ema_params, schedule, t_cfg.num_sample_images,
                                     jax.random.key(t_cfg.seed + 1), mesh, t_cfg.sample_steps)
                if is_main:
                    save_grid(imgs, os.path.join(workdir, "samples", f"step_{step:08d}.png"),
                              scale=max(1, 64 // config.data.image_size))
            if _should_stop(stop.requested, step % t_cfg.log_every == 0):
                if step % t_cfg.checkpoint_every:
                    ckpt.save(state, meta(step))
                preempted = True
                break
    finally:
        bar.close()
        ckpt.wait()
        ckpt.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        if writer is not None:
            writer.close()
            metrics_file.close()
    wall = time.time() - t0
    ips = (step - start) * t_cfg.batch_size / max(wall, 1e-9)
    if is_main:
        print(f"{'preempted' if preempted else 'done'}: step {step} ({step - start} this run) in {wall:.1f} s, "
              f"{ips:.1f} images/s, {int(_host(state.nonfinite_total))} non-finite steps skipped; workdir {workdir}",
              flush=True)
    return TrainResult(state, step - start, wall, ips, preempted)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _host(x) -> np.ndarray:
    """This process's copy of a replicated (possibly multi-host) array."""
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


@jax.jit
def _all_finite(tree):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _should_stop(local: bool, sync_point: bool) -> bool:
    """Whether any process was asked to stop. With several processes they must all decide alike, so
    they compare flags only at ``sync_point`` steps (the logging steps)."""
    if jax.process_count() == 1:
        return local
    if not sync_point:
        return False
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(local))))
