"""What every network shares, whatever its kind: the compute dtypes, the compiler options of programs
that run once, the hashable apply wrapper the samplers take, and random weights drawn on the host.

It imports nothing from the project, so the network modules (:mod:`ddim_jax.unet`, ...), the model
registry (:mod:`ddim_jax.kinds`) and the model spec (:mod:`ddim_jax.models`) can all use it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Compute dtypes a network may run in (parameters, optimizer state and the loss stay float32). float16
# is not offered: without loss scaling its gradients underflow.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
    """The jnp dtype of a compute-dtype name, or a one-line ValueError naming the allowed ones."""
    if not isinstance(name, str) or name not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be one of {', '.join(COMPUTE_DTYPES)}; got {name!r}")
    return COMPUTE_DTYPES[name]


def run_once_options(platform: str) -> dict | None:
    """XLA options for a program that runs once (parameter initialisation): on CPU, no LLVM
    optimisation, which compiles a random initialiser 2-4x faster (3.6 -> 1.8 s for the tiny UNet's,
    10.7 -> 2.5 s for a small autoencoder with its discriminator). Accelerators keep their defaults."""
    return {"xla_backend_optimization_level": 0} if platform == "cpu" else None


@dataclasses.dataclass(frozen=True)
class ModelApply:
    """Callable ``(variables, x, t, y) -> output`` of a network taking ``(x, t, y)``; equal and hash-equal
    for equal modules, so a jitted function taking it (inside a ``Partial``) does not retrace when only
    the parameters change."""

    model: Any

    def __call__(self, variables: dict, x, t, y):
        return self.model.apply(variables, x, t, y)


def make_model_fn(model, params: dict) -> jax.tree_util.Partial:
    """``model_fn(x, t, y)`` of a network with its parameters as pytree leaves (for the samplers and
    :func:`ddim_jax.guided`)."""
    return jax.tree_util.Partial(ModelApply(model), {"params": params})


def random_params(shapes, seed: int = 0):
    """Random parameters for a tree of shapes (``ModelSpec.param_shapes()``, ``jax.eval_shape`` of an init),
    drawn by numpy on the host: kernels and tables N(0, 1/fan_in) as flax's default initialiser draws them,
    vectors near flax's (norm scales near 1, biases near 0, but not exactly, so a swapped or dropped one
    shows). For tests and benchmarks that need some network's weights, not its initialiser's: compiling a
    network's init costs about as much as compiling its train step."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        if len(s.shape) >= 2:
            return (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(s.dtype)
        base = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0
        return (base + 0.1 * rng.standard_normal(s.shape)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)
