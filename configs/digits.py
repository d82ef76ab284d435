"""The embedded default: scikit-learn's 8x8 digits, trained on 2 CPU cores in minutes.

Measured choices (benchmarks/RESULTS.md): two resolution levels, 8x8 and 4x4 (a third, 2x2 level added
40% to the step time on CPU and nothing to the samples); 8 GroupNorm groups (4 channels per group at
32 channels, as DDPM's 128 / 32); no flips (base_config); the EMA with warmup, which is what lets
2,500 steps reach the quality 4,000 steps of the plain EMA did not.
"""

from ddim_jax.config import base_config


def get_config():
    c = base_config()
    c.model.ch_mult = (1, 2)
    c.model.norm_groups = 8
    c.training.num_steps = 2500
    return c
