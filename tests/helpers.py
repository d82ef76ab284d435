"""Shared by the training and workdir tests: the tiny config, a train() shorthand, array leaves."""

import json
import pathlib
import sys

import jax
import numpy as np

from ddim_jax import training
from ddim_jax.nets import random_params  # noqa: F401 -- the tests take it from here
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


def leaves(tree):
    return [np.asarray(host(x)) for x in jax.tree.leaves(tree)]


def train(workdir, devices=None, **overrides):
    return training.train(tiny_config(**overrides), str(workdir), progress=False, devices=devices)


def metric_steps(workdir):
    return [json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]


