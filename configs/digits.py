"""The embedded default: scikit-learn's 8x8 digits, trained on 2 CPU cores in minutes."""

from ddim_jax.config import base_config


def get_config():
    c = base_config()
    c.model.norm_groups = 8  # 4 channels per group at 32 channels, as DDPM's 128 / 32
    return c
