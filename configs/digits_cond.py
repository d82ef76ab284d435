"""The embedded digits, class-conditional: labels 0-9 with 10% dropped to the null label, so one network
samples any digit on request, unconditionally, and with classifier-free guidance.

    python train.py --config=configs/digits_cond.py            # workdir runs/digits_cond
    python sample.py --workdir=runs/digits_cond --guidance=2   # every digit in turn, guided
"""

from ddim_jax.config import base_config


def get_config():
    c = base_config()
    c.model.norm_groups = 8  # as configs/digits.py
    c.model.num_classes = 10
    c.training.p_uncond = 0.1
    return c
