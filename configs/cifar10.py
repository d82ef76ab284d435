"""CIFAR-10 32x32 as in DDPM/DDIM: the 35.7M-parameter UNet, batch 128, lr 2e-4, 800k steps."""

from ddim_jax.config import paper_config


def get_config():
    return paper_config("cifar10", 32, (1, 2, 2, 2), crop="none", dropout=0.1, batch_size=128,
                        num_steps=800_000, lr=2e-4)
