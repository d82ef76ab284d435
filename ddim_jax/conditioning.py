"""What a network is conditioned on, and the one function that applies it.

Every denoiser is called as ``model_fn(x, t, y)``. :class:`Conditioning` holds what it sees besides
``x_t`` and ``t``: class ``labels`` (``[B]`` or one scalar for the batch), ``context`` arrays (``[B, M, d]``
or one ``[M, d]``, e.g. text-encoder outputs) or neither, and the ``concat`` channels of a model
conditioned by concatenation (``[B, H, W, k]``, :mod:`ddim_jax.concat`). :func:`apply` evaluates the
network under it; the training loss, the samplers' ``eps_fn`` (:func:`eps_fn`), classifier-free guidance
(:func:`ddim_jax.guidance.guided_by`, which stacks a conditioning with its null) and the experiments all
go through it. :func:`check_labels` checks the class labels a model is given (the spec, guidance and
the experiments use it).

It is a pytree (its arrays are leaves), so a jitted sampler taking ``eps_fn(model_fn, cond)`` does not
recompile for new labels, contexts or observations of the same shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax.concat import with_condition


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Conditioning:
    labels: Any = None
    context: Any = None
    concat: Any = None

    def __post_init__(self):
        if self.labels is not None and self.context is not None:
            raise ValueError("a network is conditioned on labels or on context arrays, not both")

    def per_example(self, batch: int):
        """``y`` for a batch of ``batch``: labels ``[batch]``, context ``[batch, M, d]``, or None."""
        if self.labels is not None:
            y = jnp.asarray(self.labels, jnp.int32)
            if y.ndim == 1 and y.shape[0] != batch:
                raise ValueError(f"y has {y.shape[0]} labels but the batch x_t has {batch} examples; give one label "
                                 "per example or a scalar")
            return jnp.broadcast_to(y, (batch,))
        if self.context is not None:
            c = self.context
            if c.ndim == 3 and c.shape[0] != batch:
                raise ValueError(f"context has {c.shape[0]} rows but the batch x_t has {batch} examples; give one "
                                 "per example or one [M, D] for all")
            return jnp.broadcast_to(c, (batch,) + tuple(c.shape[-2:]))
        return None


def apply(model_fn, cond: Conditioning, x, t):
    """``model_fn(x', t, y)``: ``x'`` is ``x`` with the concat channels (repeated when ``x`` stacks copies of
    the batch), ``y`` the labels or context for each example."""
    if cond.concat is not None:
        x = with_condition(x, cond.concat)
    return model_fn(x, t, cond.per_example(x.shape[0]))


def eps_fn(model_fn, cond: Conditioning) -> jax.tree_util.Partial:
    """``eps_fn(x, t)`` of ``model_fn`` under ``cond``, for the samplers (``cond``'s arrays are leaves)."""
    if not isinstance(model_fn, jax.tree_util.Partial):
        model_fn = jax.tree_util.Partial(model_fn)
    return jax.tree_util.Partial(apply, model_fn, cond)


def stack(cond: Conditioning, null: Conditioning, batch: int) -> Conditioning:
    """One conditioning for the batch ``[x; x]``: ``cond``'s for the first half, ``null``'s for the second
    (classifier-free guidance's single network call); the concat channels are the same for both halves."""
    if (cond.labels is None) != (null.labels is None) or (cond.context is None) != (null.context is None):
        raise ValueError("a conditioning and its null must condition on the same thing (labels or context)")
    if cond.labels is not None:
        return Conditioning(labels=jnp.concatenate([cond.per_example(batch), null.per_example(batch)]),
                            concat=cond.concat)
    if cond.context is not None:
        return Conditioning(context=jnp.concatenate([cond.per_example(batch), null.per_example(batch)]),
                            concat=cond.concat)
    return cond


def check_labels(y, num_classes: int | None = None, name: str = "labels"):
    """Integer labels, a scalar or one per example (each in ``[0, num_classes)`` when given), as int32; a
    one-line ValueError naming ``name`` otherwise. Traced labels pass unchecked."""
    if isinstance(y, jax.core.Tracer):
        return y
    arr = y if isinstance(y, jax.Array) else np.asarray(y)
    if arr.ndim > 1 or not jnp.issubdtype(arr.dtype, jnp.integer):
        raise ValueError(f"{name} must be integers, a scalar or one per example; got dtype {arr.dtype} and shape "
                         f"{tuple(arr.shape)}")
    if num_classes is not None and arr.size:
        host = np.asarray(arr)
        bad = host[(host < 0) | (host >= num_classes)]
        if bad.size:
            raise ValueError(f"labels must be in [0, {num_classes}) (the model's classes); got {bad.flat[0]}")
    return arr.astype(jnp.int32) if isinstance(arr, jax.Array) else arr.astype(np.int32)
