"""What a diffusion-trained network learns from, given a device's rows of the batch: the images in the
diffusion's space (a latent model's encoded by its frozen autoencoder: a posterior sample, times the scale
factor), the labels (each dropped to the null label with probability ``training.p_uncond``) and the
channels a concat model is conditioned on (from the clean images). The diffusion objective and the
distillation objectives (:mod:`ddim_jax.training.distill`) share it, so a student sees its data as the
teacher did.

Each example's random draws come from its own key, folded with a fixed index per use (:func:`fold`): 0 the
timestep, 1 the noise, 3 the label drop, 4 the latent posterior sample."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ddim_jax.models import ModelSpec


def fold(keys, i: int):
    """Each example's key folded with ``i``."""
    return jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)


def diffusion_inputs(spec: ModelSpec, frozen: dict, x0, labels, keys, p_uncond: float):
    """``(x0 in the diffusion's space, labels or None, concat channels or None)`` for images ``x0`` in [-1, 1]."""
    cond = None if spec.concat is None else spec.condition(spec.observe(x0))  # from the clean images
    if spec.autoencoder is not None:
        noise = jax.vmap(lambda k: jax.random.normal(k, spec.sample_shape, jnp.float32))(fold(keys, 4))
        x0 = spec.encode(frozen, x0, noise)
    y = None
    if spec.num_classes is not None:
        y = labels
        if spec.null_label is not None:
            drop = jax.vmap(lambda k: jax.random.bernoulli(k, p_uncond))(fold(keys, 3))
            y = jnp.where(drop, spec.null_label, labels)
    return x0, y, cond
