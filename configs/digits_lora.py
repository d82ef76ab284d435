"""Fine-tuning the embedded digits model (configs/digits.py, trained first) to draw only the digits 0-4 with
rank-4 LoRA: low-rank adapters on the frozen model's convolutions (the digits UNet has no attention layers),
trained on the 0-4 subset of the training digits (``data.classes``), everything else as
configs/digits_finetune.py but for the learning rate and the steps.

    python train.py                                        # the base model, runs/digits
    python train.py --config=configs/digits_lora.py        # runs/digits_lora: model/ (merged), lora.safetensors

The run's ``lora.safetensors`` holds the adapters alone in diffusers' LoRA format (see
benchmarks/RESULTS_finetune.md for its size next to the full model's). The learning rate and steps are
measured choices (benchmarks/RESULTS_finetune.md): at 400 steps, of 1e-3, 3e-3 and 1e-2, 1e-2 did best (9.2% of
the samples outside 0-4, feature FID 44.8), still short of full fine-tuning; 800 steps at 1e-2 brought it to
5.0% and 41.0 (at 3e-2: 12.7%, 43.3).
"""

import os

from ddim_jax.config import base_config


def get_config():
    c = base_config()
    c.data.classes = (0, 1, 2, 3, 4)
    c.training.init_from = os.environ.get("DDIM_JAX_DIGITS_MODEL", "runs/digits")
    c.training.lora.update(rank=4, targets=("conv3x3", "conv1x1"))
    c.training.update(num_steps=800, lr=1e-2, warmup_steps=50, log_every=50, checkpoint_every=400,
                      sample_every=400)
    return c
