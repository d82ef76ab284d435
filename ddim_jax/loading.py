"""Reading a trained model from wherever it is kept: a model directory (:mod:`ddim_jax.models`' format)
or a training workdir (its exported EMA model, or one of its checkpoints, :mod:`ddim_jax.training`).

This module sits above both the model format and training, so neither has to reach up to the other.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

from ddim_jax import models
from ddim_jax.experiments import Model
from ddim_jax.parallel import train_mesh
from ddim_jax.training import checkpoints

log = logging.getLogger(__name__)


def is_workdir(path: str) -> bool:
    """Whether ``path`` looks like a training workdir (its checkpoints, or its config)."""
    if os.path.isdir(os.path.join(path, "params")):  # the old converted-checkpoint layout (models.load says so)
        return False
    return os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isfile(os.path.join(path, "config.json"))


def load(path, *, step: int | None = None, use_ema: bool = True) -> tuple[models.ModelSpec, dict]:
    """``(spec, params)`` from a model directory, or from a training workdir.

    For a workdir: its exported EMA model (``workdir/model``) when that is as new as its newest
    checkpoint and readable, else the newest readable checkpoint; ``step`` picks a checkpoint and
    ``use_ema=False`` its raw (non-EMA) parameters. Nothing on disk is changed.
    """
    path = os.fspath(path)
    if models.is_model_dir(path) and (step is not None or not use_ema):
        raise ValueError(f"{path} is a model directory (one set of parameters): step and use_ema apply to "
                         "training workdirs only")
    if models.is_model_dir(path) or not is_workdir(path):
        return models.load(path)  # a model directory, or the error naming what path is not
    export = os.path.join(path, models.EXPORT_DIR)
    if step is None and use_ema and models.is_model_dir(export):
        try:
            spec, params = models.load(export)
        except (ValueError, OSError) as e:
            log.warning("%s; reading the newest checkpoint instead", str(e).splitlines()[0])
        else:
            if spec.info.get("step", -1) >= max(checkpoints.step_dirs(path), default=-1):
                return spec, params
    return checkpoints.load_params(path, step=step, use_ema=use_ema)


def load_model(path, *, step: int | None = None, use_ema: bool = True, devices=None,
               dtype: str = "float32", mesh: Sequence[int] | None = None) -> Model:
    """A model directory or a training workdir (see :func:`load`) ready to sample on ``devices``,
    computing in ``dtype``, on a ``(data, fsdp)`` ``mesh`` of them (default: all on ``'data'``, parameters
    replicated; ``fsdp > 1`` splits them as training does, :func:`ddim_jax.parallel.fsdp_spec`)."""
    spec, params = load(path, step=step, use_ema=use_ema)
    return Model(spec, params, train_mesh(devices, mesh), dtype)
