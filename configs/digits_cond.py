"""The embedded digits, class-conditional: labels 0-9 with 10% dropped to the null label, so one network
samples any digit on request, unconditionally, and with classifier-free guidance.

    python train.py --config=configs/digits_cond.py            # workdir runs/digits_cond
    python sample.py --workdir=runs/digits_cond --guidance=2   # every digit in turn, guided

The network and schedule are configs/digits.py's; it trains longer (4,000 steps), as it learns ten
conditional models and the unconditional one.
"""

from ddim_jax.config import base_config


def get_config():
    c = base_config()
    c.model.ch_mult = (1, 2)  # as configs/digits.py
    c.model.norm_groups = 8
    c.model.num_classes = 10
    c.training.p_uncond = 0.1
    c.training.num_steps = 4000
    return c
