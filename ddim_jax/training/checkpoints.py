"""Training checkpoints: orbax state + a JSON record (step, data position, config) per step.

Once orbax has committed a checkpoint, :meth:`Checkpointer.seal` writes the sha256 of each of its
files to ``CHECKSUMS`` inside it; they are checked before it is restored (a checkpoint without them,
written before they existed, is restored unchecked). Only a checkpoint proven unreadable (files
missing, truncated, failing their checksums or their own metadata) is moved to
``workdir/corrupt_checkpoints/``; any other error (permissions, a full or failing disk, a
bug) stops with that error and changes nothing. Every checkpoint carries the config it was written
with, so it is compared with the given config on its own, whatever ``config.json`` says.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from ddim_jax import files
from ddim_jax.config import config_differences, flatten, to_dict
from ddim_jax.models import ModelSpec
from ddim_jax.parallel import host, host_tree, make_mesh
from ddim_jax.training import adapters
from ddim_jax.training.finetune import load_base_copy
from ddim_jax.training.latent import load_copy
from ddim_jax.training import run as run_lib
from ddim_jax.training.state import TrainState, abstract_state

log = logging.getLogger("ddim_jax")

CHECKPOINTS = "checkpoints"
CORRUPT = "corrupt_checkpoints"
CHECKSUMS = "sha256sums.json"  # inside each sealed checkpoint: {relative path: sha256} of its other files
_UNFINISHED = ".orbax-checkpoint-tmp"  # orbax writes a checkpoint under this suffix until it commits


class CorruptCheckpoint(Exception):
    """A checkpoint whose files are missing, truncated or inconsistent."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def step_dirs(workdir: str) -> list[int]:
    """Steps of the finished checkpoints in ``workdir`` (orbax writes unfinished ones under other names)."""
    d = os.path.join(workdir, CHECKPOINTS)
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


# tensorstore and orbax report unreadable data with these status codes; the rest (PERMISSION_DENIED,
# RESOURCE_EXHAUSTED, UNAVAILABLE, ...) are about the machine, not the checkpoint.
_CORRUPTION_CODES = ("DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE", "INVALID_ARGUMENT", "FAILED_PRECONDITION")


def is_corruption(e: BaseException) -> bool:
    """Whether an error while restoring proves the checkpoint unreadable (rather than the machine failing)."""
    if isinstance(e, (CorruptCheckpoint, FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError)):
        return True
    if isinstance(e, OSError):
        return e.errno in (errno.ENOENT, errno.ENOTDIR)
    if isinstance(e, (MemoryError, KeyboardInterrupt, SystemExit)):
        return False
    text = f"{type(e).__name__}: {e}"
    if any(code in text for code in ("PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "ABORTED",
                                     "DEADLINE_EXCEEDED", "Input/output error", "No space left",
                                     # the code's state no longer matches what was saved: not the file's fault
                                     "Structure mismatch", "not compatible with the stored shape")):
        return False
    return (any(code in text for code in _CORRUPTION_CODES)
            or isinstance(e, (ValueError, KeyError, TypeError, EOFError))
            # tensorstore, for a chunk file that is missing or cut short
            or "Encountered error while reading array index" in text)


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def _handlers() -> "ocp.handlers.DefaultCheckpointHandlerRegistry":
    """The state's handler: orbax's PyTree handler (the files its StandardSave writes), except that in a
    single process each replicated array is written from one device. Orbax's default on CPU and TPU splits
    it into slices, one per replica, each a program compiled per array shape and device (with 8 devices,
    ~90 compiles on the first save of configs/tiny.py's state), for writes that one process makes anyway. With several
    processes (a pod) orbax's default stands: each process then writes its part."""
    th = ocp.type_handlers
    array = th.ArrayHandler(use_replica_parallel=False if jax.process_count() == 1 else None)
    types = th.create_type_handler_registry(
        (int, th.ScalarHandler()), (float, th.ScalarHandler()), (bytes, th.ScalarHandler()),
        (np.number, th.ScalarHandler()), (np.ndarray, th.NumpyHandler()), (jax.Array, array))
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=types)
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add("state", ocp.args.PyTreeSave, handler)
    registry.add("state", ocp.args.PyTreeRestore, handler)
    return registry


class Checkpointer:
    """Orbax CheckpointManager over ``workdir/checkpoints``: state + JSON metadata."""

    def __init__(self, workdir: str, keep: int, *, create: bool = True):
        """``create``: for the run that trains here (it holds the workdir's lock), which also removes the
        unfinished checkpoints a killed or failed run left; readers (``create=False``) change nothing."""
        self.workdir = os.path.abspath(workdir)
        self.dir = os.path.join(self.workdir, CHECKPOINTS)
        if create:
            self.remove_unfinished()
        # Step directories are made before save() returns, so a failure to make one is raised there (made in
        # the background, it would leave orbax's other threads waiting for them for 5 minutes).
        self.manager = ocp.CheckpointManager(
            self.dir, options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=create, enable_async_checkpointing=True,
                async_options=ocp.AsyncOptions(create_directories_asynchronously=False)),
            handler_registry=_handlers())

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, state: TrainState, meta: dict):
        if not bool(host(_all_finite((state.params, state.ema_params)))):
            raise FloatingPointError(f"refusing to save a checkpoint with non-finite parameters at step {meta['step']}")
        try:
            self.manager.save(meta["step"], args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                                     meta=ocp.args.JsonSave(meta)), force=True)
        except BaseException:
            self.remove_unfinished()  # what the failed save wrote (writes still in flight: the next run's)
            raise

    def seal(self, step: int) -> str:
        """Writes the checksums of the committed checkpoint ``step`` (process 0, after :meth:`wait`)."""
        d = os.path.join(self.dir, str(step))
        return files.write_json(os.path.join(d, CHECKSUMS), {p: _sha256(os.path.join(d, p)) for p in _files(d)})

    def verify(self, step: int) -> None:
        """CorruptCheckpoint if a file of ``step`` is missing or differs from its checksum; a checkpoint
        without checksums passes unchecked."""
        d = os.path.join(self.dir, str(step))
        try:
            with open(os.path.join(d, CHECKSUMS)) as f:
                sums = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            raise CorruptCheckpoint(f"checkpoint {step}: its {CHECKSUMS} cannot be read ({_first_line(e)})",
                                    step) from None
        if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
            raise CorruptCheckpoint(f"checkpoint {step}: its {CHECKSUMS} is not a map of files to digests", step)
        for path, digest in sorted(sums.items()):
            full = os.path.join(d, path)
            if not os.path.isfile(full):
                raise CorruptCheckpoint(f"checkpoint {step}: its file {path} is missing", step)
            if _sha256(full) != digest:
                raise CorruptCheckpoint(f"checkpoint {step}: its file {path} does not match its checksum", step)

    def read_meta(self, step: int) -> dict:
        """The JSON record of ``step``; CorruptCheckpoint if it is missing or malformed."""
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # noqa: BLE001 -- classified below
            if is_corruption(e):
                raise CorruptCheckpoint(f"checkpoint {step}: its metadata cannot be read ({_first_line(e)})",
                                        step) from None
            raise
        if not isinstance(meta, dict) or not {"step", "config"} <= set(meta):
            raise CorruptCheckpoint(f"checkpoint {step}: its metadata lacks the step and config", step)
        return meta

    def restore_state(self, step: int, abstract: TrainState) -> TrainState:
        try:
            restore = ocp.args.PyTreeRestore(item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(
                abstract))
            return self.manager.restore(step, args=ocp.args.Composite(state=restore)).state
        except Exception as e:  # noqa: BLE001 -- classified below
            if is_corruption(e):
                raise CorruptCheckpoint(f"checkpoint {step}: its arrays cannot be read ({_first_line(e)})",
                                        step) from None
            raise RuntimeError(f"checkpoint {step} in {self.dir} could not be read ({_first_line(e)}); nothing "
                               "was changed: fix the cause and run again") from None

    def move_aside(self, step: int) -> str:
        aside = os.path.join(self.workdir, CORRUPT, str(step))
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(aside), exist_ok=True)
            if os.path.exists(aside):
                aside = f"{aside}.{len(os.listdir(os.path.dirname(aside)))}"
            shutil.move(os.path.join(self.dir, str(step)), aside)
        self.manager.reload()
        return aside

    def wait(self):
        """Returns once the checkpoint being written has committed; raises its error if it failed."""
        try:
            self.manager.wait_until_finished()
        except BaseException:
            self.remove_unfinished()  # what the failed save wrote (writes still in flight: the next run's)
            raise

    def remove_unfinished(self) -> None:
        """Removes the partial checkpoints (``N.orbax-checkpoint-tmp``) of saves that never committed."""
        if jax.process_index() != 0 or not os.path.isdir(self.dir):
            return
        for name in os.listdir(self.dir):
            if _UNFINISHED in name:
                shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)

    def close(self):
        self.manager.close()


def _from_orbax(tb) -> bool:
    while tb is not None:
        if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


class _OrbaxEchoes(logging.Filter):
    """A save that fails in the background is logged by orbax with its traceback (by each of its threads
    and again by ``wait_until_finished``, which then raises it), and the writes still in flight add
    asyncio's "exception was never retrieved" for each: echoes of the one error the run then reports.
    Drops the log records carrying an exception raised in orbax's code, and asyncio's records of a future
    whose exception was never raised in Python (a tensorstore write's error, set on its future by the C++
    library, never awaited once orbax stopped waiting); everything else passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info or (None, None, None)
        future_exc = getattr(record.args, "get", lambda _: None)("exception") if isinstance(record.args, dict) else None
        raised = exc[1] if exc[1] is not None else future_exc
        if record.name == "asyncio" and raised is not None and raised.__traceback__ is None:
            return False
        tb = exc[2] or getattr(future_exc, "__traceback__", None)
        return not _from_orbax(tb)


def quiet_failed_saves() -> None:
    """Keeps a failed background save to the one error it raises (for the command line): filters
    orbax's and asyncio's log records of it, and the "Event loop is closed" errors tensorstore reports
    (as unraisable) when writes of an aborted save finish after orbax closed their event loop."""
    for name in ("absl", "asyncio"):
        if not any(isinstance(f, _OrbaxEchoes) for f in logging.getLogger(name).filters):
            logging.getLogger(name).addFilter(_OrbaxEchoes())
    previous = sys.unraisablehook
    if getattr(previous, "_drops_closed_loop_calls", False):
        return

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"
                and unraisable.exc_traceback is not None
                and unraisable.exc_traceback.tb_frame.f_code.co_name == "call_soon_threadsafe"):
            previous(unraisable)

    hook._drops_closed_loop_calls = True
    sys.unraisablehook = hook


def _files(directory: str) -> list[str]:
    """Paths of the files under ``directory``, relative to it, but for the checksums themselves."""
    out = [os.path.relpath(os.path.join(root, n), directory) for root, _, names in os.walk(directory) for n in names]
    return sorted(p for p in out if p != CHECKSUMS)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@jax.jit
def _all_finite(tree):
    import jax.numpy as jnp

    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def resume(ckpt: Checkpointer, run, mesh, *, allow_config_change: bool):
    """``(state, meta)`` of the newest readable checkpoint, or None when the run has none.

    Each checkpoint's own config and run record are compared with ``run``'s (a
    :class:`~ddim_jax.training.run.Run`): other fields than those a resumed run may change are refused
    unless ``allow_config_change``; another architecture is always refused.
    Checkpoints proven unreadable are moved aside, with a warning, only once an older one has been
    restored; if the run has checkpoints and none can be restored, this raises and moves nothing: it
    never silently starts over.
    """
    given = to_dict(run.config)
    want = run.spec.architecture()
    unreadable = []  # newest first
    for step in reversed(ckpt.steps()):
        try:
            ckpt.verify(step)
            meta = ckpt.read_meta(step)
            saved = _saved_run_or_corrupt(meta, step)
            diff = config_differences(meta["config"], given) + run.record.differences(saved.record)
            if diff and not allow_config_change:
                raise ValueError(f"workdir {ckpt.workdir!r} holds a run with a different config "
                                 f"({', '.join(diff[:8])}) in its checkpoints; use another --workdir, or pass "
                                 "--override_config to continue with the new one")
            have = saved.spec.architecture()
            if have != want:
                raise ValueError(f"checkpoint {step} in {ckpt.dir} holds a model of another architecture "
                                 f"({_diff_keys(have, want)})")
            state = ckpt.restore_state(step, abstract_state(run, mesh))
        except CorruptCheckpoint as e:
            unreadable.append(e)
            log.warning("%s; trying the previous one", e)
            continue
        for e in unreadable:  # an older checkpoint restored: these newer ones are set aside for good
            log.warning("moved unreadable checkpoint %d to %s", e.step, ckpt.move_aside(e.step))
        return state, meta
    if unreadable:
        raise RuntimeError(f"no checkpoint of the run in {ckpt.workdir} could be restored (newest: {unreadable[0]}); "
                           "nothing was moved or deleted, and training will not start over from step 0 there: "
                           "use a new --workdir")
    return None


def _saved_run_or_corrupt(meta: dict, step: int):
    """The run a checkpoint's metadata describes, or CorruptCheckpoint if its config or record is unusable."""
    try:
        return run_lib.from_saved(meta)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CorruptCheckpoint(f"checkpoint {step}: its recorded config is unusable ({_first_line(e)})",
                                step) from None


def _diff_keys(a: dict, b: dict) -> str:
    fa, fb = flatten(a), flatten(b)
    return ", ".join(f"{k}: {fa.get(k)!r} vs {fb.get(k)!r}" for k in sorted(set(fa) | set(fb))
                     if fa.get(k) != fb.get(k))


def load_checkpoint(workdir: str, step: int | None = None):
    """``(run, state, meta)`` of the newest readable checkpoint (or ``step``) of a training run, on
    this process's first device. Each checkpoint is read with its own recorded config; nothing on disk
    is changed. An unreadable ``step`` is an error naming the checkpoint; without ``step`` unreadable
    checkpoints are skipped with a warning."""
    if not os.path.isdir(os.path.join(workdir, CHECKPOINTS)):
        raise FileNotFoundError(f"workdir {workdir!r} has no {CHECKPOINTS}/ directory")
    ckpt = Checkpointer(workdir, keep=1 << 30, create=False)
    try:
        steps = ckpt.steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {ckpt.dir}")
        if step is not None and step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {ckpt.dir} (have: {steps})")
        mesh = make_mesh(jax.local_devices()[:1])
        errors = []
        for s in [step] if step is not None else reversed(steps):
            try:
                ckpt.verify(s)
                meta = ckpt.read_meta(s)
                saved = _saved_run_or_corrupt(meta, s)
                return saved, ckpt.restore_state(s, abstract_state(saved, mesh)), meta
            except CorruptCheckpoint as e:
                if step is not None:
                    raise ValueError(f"{e} (in {ckpt.dir})") from None
                errors.append(str(e))
                log.warning("%s; trying the previous one", e)
        raise ValueError(f"no checkpoint in {ckpt.dir} could be read (newest: {errors[0]})")
    finally:
        ckpt.close()


def load_params(workdir: str, *, step: int | None = None, use_ema: bool = True) -> tuple[ModelSpec, dict]:
    """``(spec, params)`` of a training checkpoint (see :func:`load_checkpoint`); EMA params by default."""
    saved, state, meta = load_checkpoint(workdir, step)
    spec = saved.spec
    info = dict(spec.info, source=f"{os.path.abspath(workdir)} (step {meta['step']}, "
                                  f"{'EMA' if use_ema else 'raw'} params)", step=int(meta["step"]))
    spec = dataclasses.replace(spec, info=info)
    frozen = {}
    if spec.autoencoder is not None:
        frozen = load_copy(workdir)
    if adapters.enabled(saved.config):
        frozen = dict(frozen, base=load_base_copy(workdir))
    params = saved.objective.model_params(state.ema_params if use_ema else state.params, frozen)
    return spec, host_tree(params)
