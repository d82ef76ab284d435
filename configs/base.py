"""The shared defaults (the embedded digits run); every other file here overrides a few fields."""

from ddim_jax.config import base_config


def get_config():
    return base_config()
