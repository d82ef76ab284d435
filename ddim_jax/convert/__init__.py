"""Convert published DDPM/DDIM PyTorch checkpoints into ddim_jax model directories.

The output is the project's one model format (:mod:`ddim_jax.models`: ``spec.json`` and
``params.safetensors``); load it with :func:`ddim_jax.models.load`.

Three source formats, read from local files only:

- ``diffusers``: a ``UNet2DModel`` directory (``config.json`` and ``diffusion_pytorch_model.safetensors``
  or ``.bin``), as in google/ddpm-cifar10-32, ddpm-celebahq-256 and ddpm-church-256. A pipeline directory
  with a ``unet/`` subfolder works too. The noise schedule and prediction type come from
  ``scheduler_config.json`` (beside the model or in the pipeline's ``scheduler/``) when it is present, else
  DDPM's; diffusers' schedule names are translated to ours (``squaredcos_cap_v2`` is ``cosine``,
  ``trained_betas`` a ``custom`` schedule).
- ``ddim``: a state dict of the ``Model`` in ermongroup/ddim ``models/diffusion.py`` (pesser's converted
  DDPM checkpoints, ``.ckpt``/``.pth``), a training checkpoint list whose index 4 holds the EMA weights,
  or a DataParallel state dict (``module.`` prefix). These all use DDPM's schedule.
- ``stable_diffusion``: a diffusers Stable Diffusion folder (``unet/``, ``vae/``, ``scheduler/``, and
  ``text_encoder/`` with ``tokenizer/`` when it has them): one latent diffusion model directory holding the
  UNet (kind ``unet2d_condition``), the VAE and its scaling factor, and the CLIP text encoder (kind
  ``clip_text``, :mod:`ddim_jax.convert.clip_text`) with its tokenizer's files in ``tokenizer/``
  (:func:`convert_stable_diffusion`).

Modules: :mod:`ddim_jax.state_dicts` reads weights files (torch, safetensors, npz); one module per
format with its key map (``ddim``, ``diffusers_unet``, ``stable_diffusion``, ``clip_text``; ``scheduler`` translates
diffusers' scheduler configs); ``common`` holds the config-value checks and the key mapping they share;
``cli`` is :func:`convert` (a path to a model directory) and the command line::

    python -m ddim_jax.convert SRC DST [--format auto|diffusers|ddim|stable_diffusion] [--overwrite] [--image-size N]

Each model kind's diffusers or transformers class, key function, config writer and reader are in one table,
:data:`ddim_jax.convert.kinds.CONVERTERS`, which the importers, :mod:`ddim_jax.lora` and the exporter read. The
exporter (:mod:`ddim_jax.convert.export`, :func:`export_diffusers`) writes a model directory back as a diffusers
folder (a ``DDIMPipeline``, a Stable Diffusion pipeline, an ``AutoencoderKL``/``VQModel``)::

    python -m ddim_jax.convert --to diffusers MODEL_DIR OUT [--overwrite]
"""

from ddim_jax.convert.cli import FORMATS, convert, main
from ddim_jax.convert.clip_text import clip_text_key, clip_text_spec, convert_clip_text
from ddim_jax.convert.common import config_value, diffusers_key
from ddim_jax.convert.ddim import convert_ddim, ddim_key, ddim_spec
from ddim_jax.convert.diffusers_unet import convert_diffusers, diffusers_params, diffusers_spec, unet2d_key
from ddim_jax.convert.export import export_diffusers
from ddim_jax.convert.kinds import CONVERTERS, NO_EXTERNAL_FORMAT, Converter, converter
from ddim_jax.convert.scheduler import (DDPM_SCHEDULE, DIFFUSERS_PREDICTION_TYPES, DIFFUSERS_SCHEDULES,
                                        diffusers_schedule, scheduler_config)
from ddim_jax.convert.stable_diffusion import (cond_unet_key, convert_autoencoder_kl, convert_autoencoder_vq,
                                               convert_stable_diffusion, convert_unet2d_condition)
from ddim_jax.state_dicts import ConversionError, read_state_dict

__all__ = ["CONVERTERS", "ConversionError", "Converter", "DDPM_SCHEDULE", "DIFFUSERS_PREDICTION_TYPES",
           "DIFFUSERS_SCHEDULES", "FORMATS", "NO_EXTERNAL_FORMAT", "clip_text_key", "clip_text_spec", "cond_unet_key",
           "config_value", "convert", "convert_autoencoder_kl", "convert_autoencoder_vq", "convert_clip_text",
           "convert_ddim", "convert_diffusers", "convert_stable_diffusion", "convert_unet2d_condition", "converter",
           "ddim_key", "ddim_spec", "diffusers_key", "diffusers_params", "diffusers_schedule", "diffusers_spec",
           "export_diffusers", "main", "read_state_dict", "scheduler_config", "unet2d_key"]
