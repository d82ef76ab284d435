"""The forward process q(x_t | x_0), conversions between predictions, and the training loss.

Every function takes alpha-bar values (``a``) or a :class:`~ddim_jax.schedules.Schedule` plus
0-indexed timesteps; ``a`` broadcasts against the batch axis of ``x`` (shape ``[B]`` or scalar).
Arithmetic runs in float32 and results come back in the dtype of ``x``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ddim_jax.schedules import Schedule, _check_choice

PREDICTION_TYPES = ("epsilon", "x0", "v")


def _bcast(a, x):
    """Reshapes per-example ``a`` (scalar or ``[B]``) to broadcast against ``x`` ``[B, ...]``, in float32."""
    a = jnp.asarray(a, jnp.float32)
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def q_mean_std(x0, a):
    """Mean and std of q(x_t | x_0) = N(sqrt(a) x_0, (1 - a) I)."""
    a = _bcast(a, x0)
    return jnp.sqrt(a) * x0.astype(jnp.float32), jnp.sqrt(1.0 - a)


def q_sample(x0, a, noise):
    """Draws x_t = sqrt(a) x_0 + sqrt(1 - a) eps for the given standard-normal ``noise``."""
    mean, std = q_mean_std(x0, a)
    return (mean + std * noise.astype(jnp.float32)).astype(x0.dtype)


def eps_to_x0(x_t, eps, a):
    """f_theta of the paper: x_0 = (x_t - sqrt(1 - a) eps) / sqrt(a)."""
    return predict_x0_eps(eps, x_t, a, "epsilon")[0].astype(x_t.dtype)


def x0_to_eps(x_t, x0, a):
    """eps = (x_t - sqrt(a) x_0) / sqrt(1 - a)."""
    return predict_x0_eps(x0, x_t, a, "x0")[1].astype(x_t.dtype)


def v_to_x0_eps(x_t, v, a):
    """x_0 and eps from v = sqrt(a) eps - sqrt(1 - a) x_0 (Salimans & Ho); finite even at a = 0."""
    x0, eps = predict_x0_eps(v, x_t, a, "v")
    return x0.astype(x_t.dtype), eps.astype(x_t.dtype)


def x0_eps_to_v(x0, eps, a):
    """v = sqrt(a) eps - sqrt(1 - a) x_0."""
    a = _bcast(a, x0)
    return (jnp.sqrt(a) * eps - jnp.sqrt(1.0 - a) * x0.astype(jnp.float32)).astype(x0.dtype)


def predict_x0_eps(model_out, x_t, a, prediction_type: str = "epsilon"):
    """(x0, eps) in float32 from a model output of the given ``prediction_type``."""
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    a_ = _bcast(a, x_t)
    x, out = x_t.astype(jnp.float32), model_out.astype(jnp.float32)
    if prediction_type == "epsilon":
        return (x - jnp.sqrt(1.0 - a_) * out) / jnp.sqrt(a_), out
    if prediction_type == "x0":
        return out, (x - jnp.sqrt(a_) * out) / jnp.sqrt(1.0 - a_)
    return jnp.sqrt(a_) * x - jnp.sqrt(1.0 - a_) * out, jnp.sqrt(1.0 - a_) * x + jnp.sqrt(a_) * out


def training_target(x0, noise, a, prediction_type: str = "epsilon"):
    """What a model of the given ``prediction_type`` is trained to output."""
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "x0":
        return x0
    return x0_eps_to_v(x0, noise, a)


def per_example_loss(eps_fn, schedule: Schedule, x0, t, noise, *, prediction_type: str = "epsilon"):
    """``mean((model(x_t, t) - target)^2)`` per example, for given timesteps ``t`` ``[B]`` and ``noise``."""
    B = x0.shape[0]
    a = schedule.alpha_bar(t)
    x_t = q_sample(x0, a, noise)
    out = eps_fn(x_t, t).astype(jnp.float32)
    target = training_target(x0.astype(jnp.float32), noise.astype(jnp.float32), a, prediction_type)
    return jnp.mean(jnp.square(out - target).reshape(B, -1), axis=1)


def diffusion_loss(eps_fn, schedule: Schedule, x0, key, *, weights=None, prediction_type: str = "epsilon"):
    """L_gamma of the paper, a scalar: mean over the batch of ``gamma_t * mean((model - target)^2)``.

    ``t`` is drawn uniformly from ``[0, T - 1]`` and ``eps`` from N(0, I), both from ``key``.
    ``weights`` (``[T]``, gamma_t) defaults to 1 (DDPM's L_simple, which DDIM shows suffices for
    every sampler). Returns ``(loss, aux)`` with ``aux = {"t": t, "per_example": loss_per_example}``.
    """
    T = schedule.num_timesteps
    kt, kn = jax.random.split(key)
    t = jax.random.randint(kt, (x0.shape[0],), 0, T, dtype=jnp.int32)
    noise = jax.random.normal(kn, x0.shape, jnp.float32)
    per_example = per_example_loss(eps_fn, schedule, x0, t, noise, prediction_type=prediction_type)
    if weights is not None:
        weights = jnp.asarray(weights, jnp.float32)
        if weights.shape != (T,):
            raise ValueError(f"weights must have shape ({T},) (one gamma_t per timestep); got {weights.shape}")
        per_example = per_example * weights[t]
    return jnp.mean(per_example), {"t": t, "per_example": per_example}
