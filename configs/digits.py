"""The embedded default: scikit-learn's 8x8 digits, trained on 2 CPU cores in minutes."""

from ddim_jax.config import base_config


def get_config():
    return base_config()
