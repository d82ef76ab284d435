"""Shared by the benchmark scripts: interleaved timing, what they record about the checkout and the
machine they ran on, and what their ``--smoke`` runs (the same code at a tiny size) read and write."""

from __future__ import annotations

import atexit
import importlib
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def git_revision() -> str:
    """The checkout's commit, with ``+dirty`` when tracked files differ from it."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_description() -> dict:
    d = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
         "cpus_usable": len(os.sched_getaffinity(0))}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "Thread(s) per core", "Core(s) per socket", "L3 cache", "Hypervisor vendor"):
                d[k.strip()] = v.strip()
        d["avx512f"] = " avx512f " in out.replace("\n", " ") + " "
    except (OSError, subprocess.SubprocessError):
        pass
    return d


def scratch_dir() -> str:
    """A new temporary directory, removed when the process exits: where a ``--smoke`` run writes."""
    path = tempfile.mkdtemp(prefix="ddim_jax_benchmark.")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def tiny_unet(config):
    """``config`` (a UNet training config) with a one-level 32-channel UNet at 8x8, its attention in the middle
    block only (a quicker compile than one at the level too): a ``--smoke`` run's network."""
    config.data.image_size = 8
    config.model.update(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), norm_groups=8)
    return config


def tiny_autoencoder(config):
    """``config`` (an autoencoder training config) with 8 channels at every level: a ``--smoke`` run's network."""
    config.model.update(block_out_channels=(8,) * len(config.model.block_out_channels), norm_groups=8)
    return config


def random_model(config_name: str, shrink=None) -> str:
    """A model directory in a :func:`scratch_dir` holding the model ``configs/<config_name>.py`` trains (made
    smaller by ``shrink``, e.g. :func:`tiny_unet`, if given), with random weights: what a ``--smoke`` run of a
    quality benchmark reads in place of a trained run."""
    if str(ROOT) not in sys.path:  # configs/ (and ddim_jax) of this checkout
        sys.path.insert(0, str(ROOT))
    from ddim_jax import models
    from ddim_jax.config import spec_from_config
    from ddim_jax.nets import random_params

    config = importlib.import_module(f"configs.{config_name}").get_config()
    spec = spec_from_config(shrink(config) if shrink else config)
    return models.save(os.path.join(scratch_dir(), config_name), spec, random_params(spec.param_shapes()))


def random_state(run, mesh):
    """``run``'s train state on ``mesh``, laid out as ``ddim_jax.training.init_state`` makes it, with random
    params (and EMA) drawn on the host (``ddim_jax.nets.random_params``) and Adam's moments and the counters at
    zero, as at step 0: a timing benchmark's state (speed does not depend on the weights), without compiling the
    network's initialiser (about as costly as compiling its train step)."""
    import jax
    import numpy as np

    from ddim_jax.nets import random_params
    from ddim_jax.training.state import abstract_state

    shapes = abstract_state(run, mesh)
    host = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    params = random_params(shapes.params)
    host = host.replace(params=params, ema_params=jax.tree.map(np.copy, params))
    return jax.device_put(host, jax.tree.map(lambda s: s.sharding, shapes))


def sampling_batch(model, num: int, largest: int) -> int:
    """The batch to draw ``num`` samples from ``model`` (a ``ddim_jax.experiments.Model``) in: ``largest``, or
    ``num`` if fewer, rounded up to a multiple of the model's devices (the sampler splits a batch over them)."""
    n = model.mesh.devices.size
    return -(-min(num, largest) // n) * n


def interleaved(fns: dict, repeats: int) -> dict:
    """``{name: [seconds, ...]}``: each round calls every function once, in turn, so background load
    hits all of them alike."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times
