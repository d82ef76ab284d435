"""Latent diffusion on the embedded digits: a class-conditional UNet with cross-attention to class tokens,
diffusing the 8x8x3 latents of the digits' f = 4 autoencoder (train that first), labels dropped 10% of
the time so one network samples any digit, unconditionally and with classifier-free guidance.

    python train.py --config=configs/autoencoder_digits.py     # runs/autoencoder_digits
    python train.py --config=configs/latent_digits.py          # runs/latent_digits
    python sample.py --workdir=runs/latent_digits --guidance=2 # every digit in turn, decoded to 32x32
"""

from ddim_jax.config import base_config


def get_config():
    c = base_config("cross_attention_unet")
    c.data.image_size = 32  # the autoencoder's images (the digits upscaled); the UNet sees 8x8x3 latents
    c.latent.autoencoder = "runs/autoencoder_digits"
    c.model.update(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D",) * 2,
                   up_block_types=("CrossAttnUpBlock2D",) * 2, layers_per_block=1, attention_head_dim=2,
                   cross_attention_dim=32, context_tokens=1, norm_groups=8, num_classes=10)
    c.training.update(num_steps=2500, batch_size=64, lr=1e-3, p_uncond=0.1, log_every=100, checkpoint_every=500,
                      sample_every=500, num_sample_images=40)
    return c
