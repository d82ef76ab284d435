"""Fine-tuning the embedded digits model (configs/digits.py, trained first) to draw only the digits 0-4:
the whole network trains on the 0-4 subset of the training digits (``data.classes``), starting from the
trained model (``training.init_from``), for 400 steps.

    python train.py                                        # the base model, runs/digits (5 to 9 minutes)
    python train.py --config=configs/digits_finetune.py    # runs/digits_finetune, from runs/digits
    python benchmarks/finetune_quality.py --base=runs/digits    # before / after: trains both examples, measures

The model to start from is ``runs/digits`` (its exported EMA model, ``runs/digits/model``), or the model
directory or workdir named by the environment variable DDIM_JAX_DIGITS_MODEL, or
``--config.training.init_from=DIR``; the architecture and schedule are that model's. A missing one stops
the run before it writes anything, in one line. configs/digits_lora.py trains rank-4 adapters instead.

The learning rate is a measured choice (benchmarks/RESULTS_finetune.md): of 1e-4, 3e-4, 1e-3, 2e-3 and 4e-3 at
400 steps, 2e-3 (the base run's own) left the fewest samples outside 0-4 (2.3%, against 3.2% at 1e-3 and 2.5% at
4e-3, 6% at 3e-4, 11% at 1e-4), at a feature FID within 0.4 of the best (41.8, at 1e-3).
"""

import os

from ddim_jax.config import base_config


def get_config():
    c = base_config()  # model fields at their defaults: filled from the init model's spec
    c.data.classes = (0, 1, 2, 3, 4)
    c.training.init_from = os.environ.get("DDIM_JAX_DIGITS_MODEL", "runs/digits")
    c.training.update(num_steps=400, lr=2e-3, warmup_steps=50, log_every=50, checkpoint_every=200,
                      sample_every=200)
    return c
