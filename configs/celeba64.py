"""CelebA 64x64 as in DDIM: the DDIM code's 128x128 face crop resized to 64, ch_mult (1, 2, 2, 2, 4)."""

from ddim_jax.config import paper_config


def get_config():
    return paper_config("celeb_a", 64, (1, 2, 2, 2, 4), crop="celeba", dropout=0.1, batch_size=128,
                        num_steps=500_000, lr=2e-4)
