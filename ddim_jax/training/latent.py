"""Latent diffusion in a training run: the frozen autoencoder and the scale of its latents.

A diffusion config whose ``latent.autoencoder`` names a trained autoencoder (a model directory, or the
workdir of an autoencoder run, whose exported model is read) diffuses that autoencoder's latents. When
the run starts:

* :func:`resolve` reads the autoencoder, from the run's own copy ``workdir/autoencoder`` when there is
  one (a resumed run keeps the autoencoder it started with, whatever the named path holds now); the
  run record (:mod:`ddim_jax.training.run`) holds its spec and the digest of its parameters, so a run
  whose copy is gone refuses to resume with another autoencoder;
* :func:`estimate_scale` gives the scale factor when ``latent.scale_factor`` is 0: 1 / the standard deviation of the
  latents (posterior samples, as LDM's ``scale_by_std``) of the first :data:`SCALE_IMAGES` training
  images, so the diffused latents have unit variance like the images the schedules were designed for;
* :func:`save_copy` writes the copy (with the scale in its ``info``) next to the checkpoints, which hold
  the denoiser alone; the exported model (``workdir/model``) holds both networks.

Latents are encoded on the fly in the train step (the autoencoder's params are an argument of the
compiled step, not constants baked into it): encoding costs one encoder pass per image per step, while
a latent cache would fix each image's posterior sample and flip for the whole run and would have to be
invalidated with the data or the autoencoder (``benchmarks/latent_cost.py`` measures the encoder's share).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from ddim_jax import models
from ddim_jax.images import from_uint8

COPY_DIR = "autoencoder"  # the run's copy of its frozen autoencoder
SCALE_IMAGES = 1024  # training images whose latents give the scale factor
_ENCODERS: dict = {}  # estimate_scale's compiled encoders by autoencoder architecture


@dataclasses.dataclass
class FirstStage:
    """A run's frozen autoencoder: its spec, params, where it was read and whether that is the run's copy."""

    spec: models.ModelSpec
    params: dict
    source: str
    is_copy: bool
    scale_factor: float | None = None  # the copy's: what the run estimated when it started

    @property
    def sha256(self) -> str:
        """The digest of its parameters (the run record's, so a resume notices another autoencoder)."""
        return models.params_digest(self.params)


def resolve(config, workdir: str | None) -> FirstStage | None:
    """The run's frozen autoencoder (None for a pixel-space config): the run's copy in ``workdir`` when it
    has one, else what ``latent.autoencoder`` names. Nothing is written."""
    lat = config.get("latent")
    if lat is None or not lat.get("autoencoder"):
        return None
    path = lat.autoencoder
    copy = os.path.join(workdir, COPY_DIR) if workdir else None
    if copy and models.is_model_dir(copy):
        spec, params = models.load(copy)
        first = FirstStage(spec, params, copy, True, spec.info.get("scale_factor"))
    else:
        if not isinstance(path, str) or not os.path.exists(path):
            raise FileNotFoundError(f"latent.autoencoder: {path!r} does not exist (train the autoencoder first, e.g. "
                                    "python train.py --config=configs/autoencoder_digits.py)")
        spec, params = models.load(_model_dir(path))
        first = FirstStage(spec, params, os.path.abspath(path), False)
    if spec.is_diffusion:
        raise ValueError(f"latent.autoencoder: {path!r} holds a {spec.kind} diffusion model, not an autoencoder")
    d = config.data
    if (spec.image_size, spec.channels) != (d.image_size, d.channels):
        raise ValueError(f"latent.autoencoder: {path!r} encodes {spec.image_size}x{spec.image_size}x{spec.channels} "
                         f"images; data.image_size and data.channels give {d.image_size}x{d.image_size}x{d.channels}")
    return first


def estimate_scale(first: FirstStage, source, *, num: int = SCALE_IMAGES, batch: int = 128) -> float:
    """1 / std of the latents of ``source``'s first ``num`` images (a KL autoencoder's posterior samples,
    drawn from a fixed key; a VQ autoencoder's latents before quantisation)."""
    encode, params = _sampled_latents(first.spec), first.params
    n = min(num, len(source))
    total, total_sq, count = 0.0, 0.0, 0
    for i, start in enumerate(range(0, n, batch)):
        x = from_uint8(source.get(np.arange(start, min(start + batch, n))))
        z = np.asarray(encode(params, x, jax.random.fold_in(jax.random.key(0), i)), np.float64)
        total, total_sq, count = total + z.sum(), total_sq + np.square(z).sum(), count + z.size
    mean = total / count
    std = float(np.sqrt(max(total_sq / count - mean ** 2, 0.0)))
    if not np.isfinite(std) or std <= 0:
        raise ValueError(f"the latents of {first.source} have standard deviation {std}: no scale factor can be "
                         "estimated; set latent.scale_factor")
    return 1.0 / std


def _sampled_latents(ae: models.ModelSpec):
    """``encode(params, x, key)``: the latents of images ``x`` with a posterior sample of noise from ``key``,
    compiled once per autoencoder architecture (and batch shape) in a process, the parameters an argument
    rather than constants built into the program."""
    key = json.dumps(ae.architecture(), sort_keys=True)
    if key not in _ENCODERS:
        side, channels = ae.latent_shape
        _ENCODERS[key] = jax.jit(
            lambda params, x, k: ae.latents(params, x, jax.random.normal(k, (x.shape[0], side, side, channels))))
    return _ENCODERS[key]


def save_copy(workdir: str, first: FirstStage, scale: float) -> None:
    """Writes the run's copy of its autoencoder (once: an existing copy is what the run started with)."""
    if first.is_copy:
        return
    info = {"source": first.source, "scale_factor": float(scale)}
    models.save(os.path.join(workdir, COPY_DIR), dataclasses.replace(first.spec, info=info), first.params)


def _model_dir(path: str) -> str:
    """The model directory ``path`` names: itself, or a training workdir's exported model."""
    export = os.path.join(path, models.EXPORT_DIR)
    if models.is_model_dir(path):
        return path
    if models.is_model_dir(export):
        return export
    if os.path.isdir(os.path.join(path, "checkpoints")):
        raise FileNotFoundError(f"latent.autoencoder: the training workdir {path!r} has no exported model "
                                f"({export}); let its run reach a checkpoint, or name a model directory")
    return path  # models.load says what it is not


def load_copy(workdir: str) -> dict:
    """The frozen params of a latent run from its copy (to export a checkpoint's model)."""
    copy = os.path.join(workdir, COPY_DIR)
    if not models.is_model_dir(copy):
        raise FileNotFoundError(f"{workdir} trained a latent model but its autoencoder copy {copy} is missing")
    return {"autoencoder": models.load(copy)[1]}
