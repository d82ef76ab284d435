"""Consistency distillation (Song et al., 2023) of the default digits model (`python train.py`) into a one- and
few-step consistency model, on 2 CPU cores in under 20 minutes:

    python train.py --config=configs/digits_consistency.py --config.training.distill.teacher=runs/digits

The discretisation has 50 points round(linspace(0, 999, 50)); the teacher's DDIM step joins adjacent points;
the target network is the run's EMA with the paper's decay 0.95 (no warmup), which is also the exported model; the
student network outputs v (distill.prediction_type: an eps output's x0 = (x - sigma eps) / alpha blows up at t ~ T);
pseudo-Huber metric. The student samples in one step by default (sample.py --steps=2: denoise, re-noise, denoise).
The model fields are the teacher's (filled from its spec).
"""

from ddim_jax.config import base_config


def get_config():
    c = base_config()
    c.training.distill.update(method="consistency", teacher="runs/digits", steps=50, solver="ddim",
                              metric="pseudo_huber", sample_steps=1, prediction_type="v")
    c.training.update(num_steps=2000, lr=5e-4, warmup_steps=50, ema_decay=0.95, ema_warmup=False,
                      checkpoint_every=500, sample_every=500, log_every=100)
    return c
