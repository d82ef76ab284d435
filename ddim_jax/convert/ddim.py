"""The ``ddim`` format: DDPM/DDIM's original checkpoints, a state dict of the ``Model`` in ermongroup/ddim
``models/diffusion.py`` (pesser's converted DDPM checkpoints for CIFAR-10, CelebA and LSUN). The architecture
is read from the keys and shapes; the schedule is DDPM's."""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from ddim_jax.convert.common import check_image_size, map_params, unet_key, unet_spec
from ddim_jax.convert.scheduler import DDPM_SCHEDULE
from ddim_jax.models import ModelSpec
from ddim_jax.state_dicts import ConversionError, unwrap
from ddim_jax.unet import PRESETS

# Our UNet's top modules -> ermongroup's (our submodule names are theirs).
_TOP = [
    (r"down_(\d+)_block_(\d+)", lambda m, n: f"down.{m[1]}.block.{m[2]}"),
    (r"down_(\d+)_attn_(\d+)", lambda m, n: f"down.{m[1]}.attn.{m[2]}"),
    (r"down_(\d+)_downsample", lambda m, n: f"down.{m[1]}.downsample"),
    (r"up_(\d+)_block_(\d+)", lambda m, n: f"up.{m[1]}.block.{m[2]}"),
    (r"up_(\d+)_attn_(\d+)", lambda m, n: f"up.{m[1]}.attn.{m[2]}"),
    (r"up_(\d+)_upsample", lambda m, n: f"up.{m[1]}.upsample"),
    (r"mid_block_1", lambda m, n: "mid.block_1"),
    (r"mid_attn_1", lambda m, n: "mid.attn_1"),
    (r"mid_block_2", lambda m, n: "mid.block_2"),
    (r"temb_dense_(\d)", lambda m, n: f"temb.dense.{m[1]}"),
    (r"(conv_in|conv_out|norm_out)", lambda m, n: m[1]),
]


def ddim_key(path: tuple[str, ...]) -> str:
    """The ermongroup/ddim ``Model`` key of our UNet param ``path``."""
    return unet_key(path, _TOP, {}, 0, "ddim")


def _ddim_unet_kwargs(sd: Mapping[str, np.ndarray], image_size: int | None,
                      dropout: float | None) -> tuple[dict, int, int]:
    check_image_size(image_size)
    for key in ("conv_in.weight", "conv_out.weight", "temb.dense.0.weight"):
        if key not in sd:
            raise ConversionError(f"ddim checkpoint: missing key '{key}' (not an ermongroup/ddim Model state dict?)")
    ch, channels = (int(v) for v in sd["conv_in.weight"].shape[:2])
    out_ch = int(sd["conv_out.weight"].shape[0])
    if out_ch != channels:
        raise ConversionError(f"ddim checkpoint: 'conv_out.weight' has {out_ch} output channels for {channels} "
                              "input channels; only models predicting eps for every input channel are supported")
    levels = sorted({int(m[1]) for k in sd if (m := re.match(r"down\.(\d+)\.", k))})
    if levels != list(range(len(levels))) or not levels:
        raise ConversionError(f"ddim checkpoint: down levels must be numbered 0..n-1, found {levels}")
    ch_mult = []
    for level in levels:
        key = f"down.{level}.block.0.conv1.weight"
        if key not in sd:
            raise ConversionError(f"ddim checkpoint: missing key '{key}'")
        out = int(sd[key].shape[0])
        if out % ch:
            raise ConversionError(f"ddim checkpoint: '{key}' has {out} output channels, not a multiple of ch={ch}")
        ch_mult.append(out // ch)
    num_res_blocks = len({m[1] for k in sd if (m := re.match(r"down\.0\.block\.(\d+)\.", k))})
    attn_levels = [lv for lv in levels if f"down.{lv}.attn.0.q.weight" in sd]
    resamp_with_conv = len(levels) == 1 or "down.0.downsample.conv.weight" in sd
    if image_size is None:
        if not attn_levels:
            raise ConversionError("ddim checkpoint: no attention level to infer the image size from; "
                                  "pass image_size (--image-size)")
        image_size = 16 * 2 ** attn_levels[0]  # DDPM's models attend at 16x16
    kwargs = dict(ch=ch, out_ch=out_ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
                  attn_resolutions=tuple(image_size // 2 ** lv for lv in attn_levels), dropout=0.0,
                  resamp_with_conv=resamp_with_conv, norm_groups=32, num_classes=None)
    if dropout is None:
        dropout = next((p["dropout"] for p in PRESETS.values()
                        if {**p, "dropout": 0.0} == kwargs), 0.0)
    kwargs["dropout"] = float(dropout)
    return kwargs, image_size, channels




def ddim_spec(state_dict: Mapping[str, np.ndarray], image_size: int | None = None,
              dropout: float | None = None) -> ModelSpec:
    """The ``unet`` spec of an ermongroup/ddim ``Model`` state dict (see :func:`convert_ddim`)."""
    kwargs, image_size, channels = _ddim_unet_kwargs(state_dict, image_size, dropout)
    return unet_spec(kwargs, image_size, channels, DDPM_SCHEDULE, "epsilon", "ddim model")


def convert_ddim(state_dict: Mapping[str, Any], image_size: int | None = None,
                 dropout: float | None = None) -> tuple[ModelSpec, dict]:
    """Convert an ermongroup/ddim ``Model`` state dict into ``(spec, params)`` (DDPM's schedule, epsilon).

    A ``module.`` prefix (DataParallel) is stripped. The architecture is read from the key names and
    shapes; ``image_size`` (needed to express attention levels in pixels) defaults to 16 px at the first
    attention level, as in all of DDPM's models. ``dropout`` defaults to that of the matching preset, else 0.
    The ``logvar`` entry of ermongroup's 'bayesian' model type is ignored.
    """
    sd, _ = unwrap(state_dict, "state_dict")
    spec = ddim_spec(sd, image_size, dropout)
    return spec, map_params(sd, spec.param_shapes(), ddim_key, "ddim", ignore=("logvar",))
