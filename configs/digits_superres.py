"""Conditioning by concatenation on the embedded digits: 2x super-resolution. The network sees x_t next
to the digit box-filtered to 4x4 and resized back to 8x8 (ddim_jax.concat's "superres2x"), and learns
to draw 8x8 digits that agree with that low-resolution view.

    python train.py --config=configs/digits_superres.py         # workdir runs/digits_superres
    python sample.py --workdir=runs/digits_superres             # held-out digits' 4x4 views, upscaled
    python benchmarks/superres_quality.py --workdir=runs/digits_superres

The network and schedule are configs/digits.py's.
"""

from ddim_jax.config import base_config


def get_config():
    c = base_config()
    c.model.ch_mult = (1, 2)  # as configs/digits.py
    c.model.norm_groups = 8
    c.diffusion.concat = "superres2x"
    c.training.num_steps = 2500
    return c
