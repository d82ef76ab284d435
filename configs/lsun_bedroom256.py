"""LSUN bedroom 256x256 as in DDPM: center crop, ch_mult (1, 1, 2, 2, 4, 4), batch 64, lr 2e-5."""

from ddim_jax.config import paper_config


def get_config():
    return paper_config("lsun/bedroom", 256, (1, 1, 2, 2, 4, 4), crop="center", dropout=0.0,
                        batch_size=64, num_steps=2_400_000, lr=2e-5)
