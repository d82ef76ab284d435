"""Progressive distillation (Salimans and Ho, 2022) of the default digits model (`python train.py`, a 50-step
DDIM model) into 16-, 8-, 4-, 2- and 1-step students, on 2 CPU cores in under 20 minutes:

    python train.py --config=configs/digits_progressive.py --config.training.distill.teacher=runs/digits

Five rounds of 400 training steps; round r's student takes 16 / 2^r DDIM steps and is exported to
runs/digits_progressive/rounds/steps_<N> (the last, 1 step, also to runs/digits_progressive/model). The student
predicts v (the eps teacher's copy learns the new output in the first round) with the truncated-SNR weight.
The model fields are the teacher's (filled from its spec). The EMA decays fast (0.99): each round's exported
EMA student is the next round's teacher, so it must follow its round, not remember the last.
"""

from ddim_jax.config import base_config


def get_config():
    c = base_config()
    c.training.distill.update(method="progressive", teacher="runs/digits", steps=16, final_steps=1, round_steps=400,
                              prediction_type="v", weighting="truncated_snr")
    c.training.update(num_steps=2000, lr=5e-4, warmup_steps=50, ema_decay=0.99, checkpoint_every=400,
                      sample_every=400, log_every=100)
    return c
