"""Classifier-free guidance (Ho and Salimans 2022) as an ordinary ``eps_fn(x_t, t)``.

:func:`guided` turns a class-conditional model ``model_fn(x_t, t, labels)`` (trained with label
dropout, so that ``null_label`` gives the unconditional model) into an ``eps_fn`` that every sampler
and solver accepts (:func:`ddim_jax.ddim_sample`, :func:`ddim_jax.sample`, the encoder);
:func:`guided_context` does the same for a model conditioned on context arrays (text embeddings for a
cross-attention UNet), guided away from a null context (the empty prompt's embedding).

Convention (diffusers' ``guidance_scale``)::

    out = uncond + scale * (cond - uncond)

so ``scale = 1`` is no guidance (the conditional model), ``scale = 0`` the unconditional model, and
``scale > 1`` extrapolates away from the unconditional output. Ho and Salimans write
``(1 + w) cond - w uncond``: their ``w`` is ``scale - 1`` (their w = 0 is no guidance). The sum is
evaluated as ``cond + (scale - 1) * (cond - uncond)``, the same thing, so that ``scale = 1`` returns
the conditional output exactly.

Guidance acts on the model's output in whatever parameterisation the model predicts (epsilon, x0
or v); the sampler is then told that parameterisation with its ``prediction_type`` as usual. The
three are affine in one another at fixed (x_t, t) with coefficients independent of the label, so
the linear combination is the same guided model whichever one it is applied to; only the optional
rescale (a per-example std, not linear) depends on the choice.

Guidance rescale (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed",
section 3.4): ``rescaled = out * std(cond) / std(out)`` with stds per example over all non-batch
axes, then ``out = rescale * rescaled + (1 - rescale) * out``; ``rescale`` in [0, 1] (they suggest
0.7, on v-prediction outputs). An example whose guided output has zero std (e.g. 1-D data) is
left unrescaled.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax.conditioning import Conditioning, apply, check_labels, stack

__all__ = ["guided", "guided_by", "guided_context"]


def guided(model_fn, y, scale, *, null_label, rescale=0.0):
    """The classifier-free-guided ``eps_fn(x_t, t)`` of ``model_fn(x_t, t, labels)`` for labels ``y``.

    Each call runs ``model_fn`` ONCE, on the batch ``[x_t; x_t]`` with timesteps ``[t; t]`` and labels
    ``[y; null_label]`` (so 2B examples), and combines the halves as ``uncond + scale * (cond -
    uncond)`` (see the module docstring: scale 1 = no guidance, scale 0 = unconditional; Ho and
    Salimans' w is scale - 1), then applies the optional guidance ``rescale``.

    ``y``: integer labels, a scalar (the same class for the whole batch) or ``[B]`` (one per example,
    B the sampler's batch). ``scale``: a finite real number (or a scalar array). ``null_label``: the
    integer label of the unconditional model. ``rescale``: a number in [0, 1], 0 = off.

    Returns a ``jax.tree_util.Partial`` whose leaves include ``model_fn``'s own leaves (if it is a
    Partial), ``y``, ``scale``, ``null_label`` and ``rescale``: the samplers pass it to their compiled
    program as an argument, so a new scale, new labels (of the same shape) or a new rescale reuse
    the compiled program instead of recompiling. Pass networks as ``Partial(apply, variables)`` for
    the same reason.
    """
    y = check_labels(y, name="y")
    if isinstance(null_label, bool) or not isinstance(null_label, (int, np.integer)):
        raise ValueError(f"null_label must be an integer (the label of the unconditional model); got {null_label!r}")
    return guided_by(model_fn, Conditioning(labels=y), Conditioning(labels=np.int32(null_label)), scale,
                     rescale=rescale)


def guided_context(model_fn, context, scale, *, null_context, rescale=0.0):
    """The classifier-free-guided ``eps_fn(x_t, t)`` of ``model_fn(x_t, t, context)`` for a context array.

    ``context``: ``[M, D]`` (one for the whole batch) or ``[B, M, D]`` (one per example), e.g. a text
    encoder's output; ``null_context``: the unconditional model's context (``[M, D]`` or ``[B, M, D]``, e.g.
    the empty prompt's embedding). Like :func:`guided`: one ``model_fn`` call on ``[x_t; x_t]`` with the
    contexts ``[context; null_context]``, ``uncond + scale * (cond - uncond)``, optional ``rescale``; the
    contexts and the scale are leaves of the returned Partial (new ones do not recompile). Build it
    outside jit (the contexts are checked for finite values).
    """
    arrays = {}
    for name, c in (("context", context), ("null_context", null_context)):
        arr = c if isinstance(c, jax.Array) else np.asarray(c)
        if arr.ndim not in (2, 3) or not jnp.issubdtype(arr.dtype, jnp.floating):
            raise ValueError(f"{name} must be a float array [M, D] or [batch, M, D]; got dtype {arr.dtype} and "
                             f"shape {tuple(arr.shape)}")
        if not bool(jnp.all(jnp.isfinite(arr))):
            raise ValueError(f"{name} has non-finite values")
        arrays[name] = arr
    if arrays["context"].shape[-2:] != arrays["null_context"].shape[-2:]:
        raise ValueError(f"context {tuple(arrays['context'].shape)} and null_context "
                         f"{tuple(arrays['null_context'].shape)} must have the same [M, D]")
    return guided_by(model_fn, Conditioning(context=arrays["context"]), Conditioning(context=arrays["null_context"]),
                     scale, rescale=rescale)


def guided_by(model_fn, cond: Conditioning, null: Conditioning, scale, *, rescale=0.0):
    """The guided ``eps_fn(x_t, t)`` of ``model_fn(x_t, t, y)`` under the conditioning ``cond``, guided away
    from ``null`` (the unconditional model's: the null label, the empty prompt's context): one call of
    the network on ``[x_t; x_t]`` under :func:`ddim_jax.conditioning.stack`, combined as in :func:`guided`."""
    if not callable(model_fn):
        raise TypeError(f"model_fn must be callable as model_fn(x_t, t, y); got {type(model_fn).__name__}")
    if not isinstance(model_fn, jax.tree_util.Partial):
        model_fn = jax.tree_util.Partial(model_fn)
    scale = _check_real("scale", scale, -math.inf, math.inf, "a finite real number (1 = no guidance, "
                        "0 = the unconditional model)")
    rescale = _check_real("rescale", rescale, 0.0, 1.0, "a number in [0, 1] (0 = no rescale)")
    return jax.tree_util.Partial(_guided_output, model_fn, cond, null, scale, rescale)


def _check_real(name, value, lo, hi, what):
    if isinstance(value, (jax.Array, np.ndarray, np.generic)) and np.shape(value) == ():
        try:
            value = float(value)
        except Exception:  # a tracer: guided() is built outside jit, and the sampler traces the value
            raise ValueError(f"{name} must be a concrete number when guided() is called") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            math.isfinite(value) and lo <= value <= hi):
        raise ValueError(f"{name} must be {what}; got {value!r}")
    return np.float32(value)


def _guided_output(model_fn, cond, null, scale, rescale, x_t, t):
    both = stack(cond, null, x_t.shape[0])
    return _combine(apply(model_fn, both, jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t])), x_t, scale, rescale)


def _combine(out, x_t, scale, rescale):
    """The guided output from the model's output ``out`` on ``[x_t; x_t]`` (conditional half first)."""
    B = x_t.shape[0]
    if out.shape != (2 * B,) + tuple(x_t.shape[1:]):
        raise ValueError(f"model_fn returned shape {tuple(out.shape)} for a batch of shape "
                         f"{(2 * B,) + tuple(x_t.shape[1:])}; expected that shape")
    cond, uncond = out[:B].astype(jnp.float32), out[B:].astype(jnp.float32)
    g = cond + (scale - 1.0) * (cond - uncond)  # = uncond + scale * (cond - uncond); exact at scale 1
    axes = tuple(range(1, g.ndim))
    std_c = jnp.std(cond, axis=axes, keepdims=True)
    std_g = jnp.std(g, axis=axes, keepdims=True)
    factor = jnp.where(std_g > 0, std_c / jnp.where(std_g > 0, std_g, 1.0), 1.0)
    g = g + rescale * (g * factor - g)  # rescale * rescaled + (1 - rescale) * g; exact at rescale 0
    return g.astype(x_t.dtype)
