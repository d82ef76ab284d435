"""A very small run for tests: digits, a tiny UNet, a few steps."""

from ddim_jax.config import base_config


def get_config():
    c = base_config()
    c.model.ch = 32
    c.model.ch_mult = (1,)
    c.model.norm_groups = 8
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = ()
    c.diffusion.num_timesteps = 100
    c.training.batch_size = 16
    c.training.num_steps = 8
    c.training.warmup_steps = 2
    c.training.log_every = 2
    c.training.checkpoint_every = 4
    c.training.sample_every = 0
    c.training.num_sample_images = 4
    c.training.sample_steps = 5
    return c
