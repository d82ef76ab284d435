"""The default configuration every file in configs/ starts from (ml_collections)."""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.data = d = ml_collections.ConfigDict()
    d.dataset = "digits"  # 'digits', 'folder', or a tfds name such as 'cifar10', 'celeb_a', 'lsun/church_outdoor'
    d.split = "train"
    d.data_dir = ""  # tfds data_dir ('' = tfds' default, ~/tensorflow_datasets)
    d.folder = ""  # for dataset = 'folder'
    d.image_size = 8
    d.channels = 1
    d.crop = "center"  # 'center', 'celeba' or 'none' (tfds and folder sources)
    d.random_flip = True

    c.model = m = ml_collections.ConfigDict()  # ddim_jax.unet.UNet fields
    m.ch = 32
    m.ch_mult = (1, 2, 2)
    m.num_res_blocks = 1
    m.attn_resolutions = ()
    m.dropout = 0.0
    m.resamp_with_conv = True

    c.diffusion = f = ml_collections.ConfigDict()
    f.schedule = "cosine"  # for the 8x8 digits; the paper's configs use 'linear' (paper_config)
    f.beta_start = 1e-4
    f.beta_end = 0.02
    f.num_timesteps = 1000
    f.prediction_type = "epsilon"

    c.training = t = ml_collections.ConfigDict()
    t.batch_size = 128  # global, over all devices and hosts
    t.num_steps = 4000
    t.lr = 2e-3
    t.warmup_steps = 200
    t.grad_clip = 1.0
    t.ema_decay = 0.999
    t.seed = 0
    t.steps_per_dispatch = 1  # train steps per compiled call (lax.scan)
    t.log_every = 100
    t.checkpoint_every = 1000
    t.keep_checkpoints = 3
    t.sample_every = 1000  # 0 = never
    t.num_sample_images = 64
    t.sample_steps = 50  # DDIM steps for the sample grids
    t.max_nonfinite = 10  # stop after this many non-finite losses in a row
    return c


def paper_config(dataset: str, image_size: int, ch_mult: tuple, *, crop: str, dropout: float, batch_size: int,
                 num_steps: int, lr: float) -> ml_collections.ConfigDict:
    """The DDPM/DDIM setup for a 3-channel dataset: ch 128, 2 res blocks, attention at 16x16,
    warmup 5000, EMA 0.9999, grad clip 1.0, linear betas 1e-4 .. 0.02 over T = 1000."""
    c = base_config()
    c.data.update(dataset=dataset, image_size=image_size, channels=3, crop=crop)
    c.diffusion.update(schedule="linear", beta_start=1e-4, beta_end=0.02, num_timesteps=1000)
    c.model.update(ch=128, ch_mult=ch_mult, num_res_blocks=2, attn_resolutions=(16,), dropout=dropout)
    c.training.update(batch_size=batch_size, num_steps=num_steps, lr=lr, warmup_steps=5000, ema_decay=0.9999,
                      checkpoint_every=10_000, sample_every=10_000)
    return c
