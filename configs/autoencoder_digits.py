"""The embedded digits' autoencoder: 8x8 digits upscaled to 32x32, an f = 4 KL autoencoder to 8x8x3 latents
(LDM's f = 4 shape), trained with L1 + KL + a PatchGAN from half-way. The latent-diffusion configs name
its workdir as their autoencoder.

    python train.py --config=configs/autoencoder_digits.py        # into runs/autoencoder_digits
"""

from ddim_jax.autoencoder import DIGITS_F4
from ddim_jax.config import autoencoder_config


def get_config():
    c = autoencoder_config()
    c.data.image_size = 32
    c.model.update(**DIGITS_F4)
    c.loss.update(disc_start=1250, disc_layers=2, disc_channels=32)
    c.training.update(num_steps=2500, batch_size=32, log_every=100, checkpoint_every=500, sample_every=500,
                      num_sample_images=16)
    return c
