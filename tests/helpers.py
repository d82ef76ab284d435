"""Shared by the training and workdir tests: the tiny config, a train() shorthand, array leaves."""

import json
import pathlib
import sys

import jax
import numpy as np

from ddim_jax import training
from ddim_jax.parallel import host

ROOT = pathlib.Path(__file__).resolve().parents[1]
# lr = 1e38 sends the parameters to ~1e38 after the first update, and every later loss overflows.
EXPLODING = dict(lr=1e38, max_nonfinite=2)


def tiny_config(**training_overrides):
    sys.path.insert(0, str(ROOT))
    try:
        from configs.tiny import get_config
    finally:
        sys.path.remove(str(ROOT))
    c = get_config()
    c.training.update(training_overrides)
    return c


def random_params(shapes, seed=0):
    """Random parameters for a tree of shapes (``ModelSpec.param_shapes()``, ``jax.eval_shape`` of an init),
    drawn by numpy: kernels and tables N(0, 1/fan_in) as flax's default initialiser draws them, vectors near
    flax's (norm scales near 1, biases near 0, but not exactly, so a swapped or dropped one shows). For tests
    that need some network's weights, not its initialiser's: compiling a network's init costs as much as
    compiling its train step."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        if len(s.shape) >= 2:
            return (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(s.dtype)
        base = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0
        return (base + 0.1 * rng.standard_normal(s.shape)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def leaves(tree):
    return [np.asarray(host(x)) for x in jax.tree.leaves(tree)]


def train(workdir, devices=None, **overrides):
    return training.train(tiny_config(**overrides), str(workdir), progress=False, devices=devices)


def metric_steps(workdir):
    return [json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]


