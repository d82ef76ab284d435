"""Config checks that belong to the config itself (the model block's are the registry's: test_kinds.py)."""

import pytest
from helpers import tiny_config

from ddim_jax.config import MAX_PREFETCH, autoencoder_config, base_config, validate_config


def test_prefetch_is_bounded():
    config = tiny_config()
    config.data.prefetch = MAX_PREFETCH
    validate_config(config)
    config.data.prefetch = 10 ** 6  # each prefetched step is a whole global batch held in host memory
    with pytest.raises(ValueError, match=rf"data.prefetch must be an integer in \[0, {MAX_PREFETCH}\]; got 1000000"):
        validate_config(config)


def test_schemas_take_only_their_objectives_kinds():
    with pytest.raises(ValueError, match="kind must be one of unet, cross_attention_unet"):
        base_config("autoencoder_kl")
    with pytest.raises(ValueError, match="kind must be one of autoencoder_kl, autoencoder_vq"):
        autoencoder_config("unet")
    with pytest.raises(ValueError, match="kind must be one of"):
        base_config("unet2d_condition")  # conditioned on context arrays: converted, not trained
