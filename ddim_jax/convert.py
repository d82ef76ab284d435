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
- ``stable_diffusion``: a diffusers Stable Diffusion folder (``unet/``, ``vae/``, ``scheduler/``; the
  text encoder is not read): one latent diffusion model directory holding the UNet (kind
  ``unet2d_condition``), the VAE and its scaling factor (:func:`convert_stable_diffusion`).

Command line::

    python -m ddim_jax.convert SRC DST [--format auto|diffusers|ddim|stable_diffusion] [--overwrite] [--image-size N]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ddim_jax import models
from ddim_jax.models import ModelSpec
from ddim_jax.schedules import make_schedule
from ddim_jax.unet import PRESETS, UNet, count_params, param_shapes

__all__ = ["ConversionError", "convert_diffusers", "convert_ddim", "convert", "diffusers_schedule",
           "read_state_dict", "DDPM_SCHEDULE"]

# DDPM's noise schedule (a ModelSpec schedule), used by every checkpoint of the paper.
DDPM_SCHEDULE = {"name": "linear", "num_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02}

# diffusers' beta_schedule names -> ours (ddim_jax.schedules.SCHEDULES; make_schedule gives the same betas),
# and diffusers' prediction types -> ours (ddim_jax.diffusion.PREDICTION_TYPES).
DIFFUSERS_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine",
                       "sigmoid": "sigmoid"}
DIFFUSERS_PREDICTION_TYPES = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}
# DDPMScheduler.__init__ defaults for the settings we read.
_DIFFUSERS_SCHEDULER_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                     beta_schedule="linear", trained_betas=None, prediction_type="epsilon",
                                     rescale_betas_zero_snr=False)

FORMATS = ("auto", "diffusers", "ddim", "stable_diffusion")
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the offending key or setting."""


# ----------------------------------------------------------------------------------------------
# Config values: each one the converter reads is checked where it is read, by config_value.


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_positive_int(v: Any) -> bool:
    return _is_int(v) and v > 0


def _is_list(v: Any, item) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(item(x) for x in v)


# What a config value may be: (how the error says it, the test).
POSITIVE_INT = ("a positive integer", _is_positive_int)
OPTIONAL_POSITIVE_INT = ("null or a positive integer", lambda v: v is None or _is_positive_int(v))
POSITIVE_INTS = ("a non-empty list of positive integers", lambda v: _is_list(v, _is_positive_int))
POSITIVE_INT_OR_LIST = ("a positive integer or a non-empty list of them",
                        lambda v: _is_positive_int(v) or _is_list(v, _is_positive_int))
NAMES = ("a non-empty list of block names", lambda v: _is_list(v, lambda x: isinstance(x, str)))
NUMBER = ("a finite number", _is_number)
POSITIVE_NUMBER = ("a positive number", lambda v: _is_number(v) and v > 0)
DROPOUT = ("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1)
BOOL = ("true or false", lambda v: isinstance(v, bool))
OPTIONAL_NUMBERS = ("null or a non-empty list of numbers", lambda v: v is None or _is_list(v, _is_number))
MAX_TIMESTEPS = 100_000
TIMESTEPS = (f"an integer from 1 to {MAX_TIMESTEPS}", lambda v: _is_int(v) and 1 <= v <= MAX_TIMESTEPS)


def config_value(config: Mapping[str, Any], key: str, default: Any, allowed: tuple, where: str) -> Any:
    """``config[key]`` (``default`` when absent) if ``allowed`` (one of the tuples above) accepts it, else a
    one-line :class:`ConversionError` naming ``where`` (the config file), the field and what is allowed."""
    value = config.get(key, default)
    what, ok = allowed
    if not ok(value):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise ConversionError(f"{where}: {key}={shown} is not allowed ({key} must be {what})")
    return value


def _check_image_size(image_size: int | None) -> None:
    if image_size is not None and not _is_positive_int(image_size):
        raise ConversionError(f"--image-size={image_size} is not allowed (image_size must be a positive integer)")


# ----------------------------------------------------------------------------------------------
# Reading files


def _to_numpy(key: str, value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor
        import torch

        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.to(torch.float32)
        return value.numpy()
    if isinstance(value, np.ndarray):
        return value
    raise ConversionError(f"checkpoint entry '{key}' is a {type(value).__name__}, not a tensor")


def _unwrap(obj: Any, path: str) -> tuple[dict, str | None]:
    """The model state dict inside a loaded object, and a note on which entry was taken."""
    note = None
    if isinstance(obj, (list, tuple)):
        # ermongroup/ddim training checkpoint: [model, optimizer, epoch, step, ema] (ema only when enabled).
        if len(obj) > 4 and isinstance(obj[4], Mapping):
            obj, note = obj[4], "list index 4 (EMA weights)"
        elif len(obj) > 0 and isinstance(obj[0], Mapping):
            obj, note = obj[0], "list index 0 (model weights; no EMA entry)"
        else:
            raise ConversionError(f"{path}: a list checkpoint must hold a state dict at index 4 (EMA) or 0")
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: expected a state dict, got {type(obj).__name__}")
    keys = list(obj)
    if keys and all(isinstance(k, str) and k.startswith("module.") for k in keys):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return {k: _to_numpy(k, v) for k, v in obj.items()}, note


def _one_line(e: BaseException, limit: int = 300) -> str:
    """``TypeName: message`` on one line (library messages can span several), cut at ``limit`` characters."""
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:limit]}{'...' if len(msg) > limit else ''}"


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], str | None]:
    """Read a weights file into {key: float32/int numpy array}; returns it and a note on the entry taken.

    ``.safetensors`` needs only ``safetensors``; ``.bin``/``.ckpt``/``.pth``/``.pt`` need ``torch``.
    A file that cannot be read raises a one-line :class:`ConversionError` naming it.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            sd = load_file(path)
        except (SafetensorError, ValueError, TypeError, OSError) as e:
            raise ConversionError(f"cannot read {path} as a safetensors file ({_one_line(e)})") from None
        return _unwrap(sd, path)
    try:
        import torch
    except ImportError:
        raise ImportError(f"reading {os.path.basename(path)} needs the 'torch' package (pip install torch); "
                          ".safetensors files do not") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the path
        raise ConversionError(f"cannot read {path} with torch.load(weights_only=True) ({_one_line(e)})") from None
    return _unwrap(obj, path)


# ----------------------------------------------------------------------------------------------
# Key mapping


_DDIM_TOP = [
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
_DDIM_SUB: dict[str, str] = {}  # our submodule names are ermongroup's

_DIFFUSERS_TOP = [
    (r"down_(\d+)_block_(\d+)", lambda m, n: f"down_blocks.{m[1]}.resnets.{m[2]}"),
    (r"down_(\d+)_attn_(\d+)", lambda m, n: f"down_blocks.{m[1]}.attentions.{m[2]}"),
    (r"down_(\d+)_downsample", lambda m, n: f"down_blocks.{m[1]}.downsamplers.0"),
    (r"up_(\d+)_block_(\d+)", lambda m, n: f"up_blocks.{n - 1 - int(m[1])}.resnets.{m[2]}"),
    (r"up_(\d+)_attn_(\d+)", lambda m, n: f"up_blocks.{n - 1 - int(m[1])}.attentions.{m[2]}"),
    (r"up_(\d+)_upsample", lambda m, n: f"up_blocks.{n - 1 - int(m[1])}.upsamplers.0"),
    (r"mid_block_1", lambda m, n: "mid_block.resnets.0"),
    (r"mid_attn_1", lambda m, n: "mid_block.attentions.0"),
    (r"mid_block_2", lambda m, n: "mid_block.resnets.1"),
    (r"temb_dense_0", lambda m, n: "time_embedding.linear_1"),
    (r"temb_dense_1", lambda m, n: "time_embedding.linear_2"),
    (r"class_embed", lambda m, n: "class_embedding"),
    (r"norm_out", lambda m, n: "conv_norm_out"),
    (r"(conv_in|conv_out)", lambda m, n: m[1]),
]
_DIFFUSERS_SUB = {"temb_proj": "time_emb_proj", "nin_shortcut": "conv_shortcut", "norm": "group_norm",
                  "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}
_DIFFUSERS_LEGACY_ATTN = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _ref_key(path: tuple[str, ...], fmt: str, num_levels: int) -> str:
    top_rules, sub_map = (_DDIM_TOP, _DDIM_SUB) if fmt == "ddim" else (_DIFFUSERS_TOP, _DIFFUSERS_SUB)
    top, *subs, leaf = path
    for pattern, fn in top_rules:
        m = re.fullmatch(pattern, top)
        if m:
            parts = [fn(m, num_levels)] + [sub_map.get(s, s) for s in subs] + [_LEAF[leaf]]
            return ".".join(parts)
    raise ConversionError(f"the {fmt} format has no counterpart of params '{'/'.join(path)}'")


def _torch_layout(expected: tuple[int, ...], leaf: str, src_ndim: int) -> tuple[int, ...]:
    """The shape the reference stores for a param of our ``expected`` shape."""
    if leaf == "kernel" and len(expected) == 4:  # conv: HWIO <- OIHW
        kh, kw, cin, cout = expected
        return (cout, cin, kh, kw)
    if leaf == "kernel" and len(expected) == 2:  # dense: IO <- OI (Linear) or OI11 (1x1 conv)
        cin, cout = expected
        return (cout, cin, 1, 1) if src_ndim == 4 else (cout, cin)
    return tuple(expected)


def _to_flax(value: np.ndarray, leaf: str, expected: tuple[int, ...]) -> np.ndarray:
    if leaf == "kernel" and len(expected) == 4:
        return np.transpose(value, (2, 3, 1, 0))
    if leaf == "kernel" and len(expected) == 2:
        return value.reshape(value.shape[0], value.shape[1]).T
    return value


def _map_params(state_dict: Mapping[str, np.ndarray], unet_kwargs: dict, image_size: int, channels: int,
                fmt: str, ignore: tuple[str, ...] = ()) -> dict:
    """Build our params from ``state_dict``; raises ConversionError on missing/unexpected keys, bad shapes
    or non-finite values."""
    shapes = param_shapes(UNet(**unet_kwargs), image_size, channels)
    num_levels = len(unet_kwargs["ch_mult"])
    return _map(state_dict, shapes, lambda path: _ref_key(path, fmt, num_levels), fmt, ignore)


def _map(state_dict: Mapping[str, np.ndarray], shapes, ref_key, fmt: str, ignore: tuple[str, ...] = ()) -> dict:
    """Params of the shapes ``shapes`` from ``state_dict``, our path -> ``ref_key(path)``; raises
    ConversionError naming the first missing/unexpected key, bad shape or non-finite value."""
    flat, used, missing, mismatched, nonfinite = {}, set(), [], [], []
    for path, spec in traverse_util.flatten_dict(shapes).items():
        key, leaf, expected = ref_key(path), path[-1], tuple(spec.shape)
        if key not in state_dict:
            missing.append(f"missing key '{key}' (model expects shape {_torch_layout(expected, leaf, 2)})")
            continue
        used.add(key)
        value = np.asarray(state_dict[key])
        want = _torch_layout(expected, leaf, value.ndim)
        if tuple(value.shape) != want:
            mismatched.append(f"shape mismatch for key '{key}': checkpoint has {tuple(value.shape)}, "
                              f"model expects {want}")
            continue
        if not np.all(np.isfinite(value)):
            nonfinite.append(f"key '{key}' has non-finite values (NaN or inf)")
            continue
        flat[path] = jnp.asarray(_to_flax(value, leaf, expected), dtype=jnp.float32)
    unexpected = [f"unexpected key '{k}' with shape {tuple(np.shape(v))}" for k, v in state_dict.items()
                  if k not in used and k not in ignore]
    problems = missing + unexpected + mismatched + nonfinite
    if problems:
        more = f" (and {len(problems) - 1} more: {len(missing)} missing, {len(unexpected)} unexpected, " \
               f"{len(mismatched)} shape mismatches, {len(nonfinite)} non-finite)" if len(problems) > 1 else ""
        raise ConversionError(f"{fmt} checkpoint: {problems[0]}{more}")
    return traverse_util.unflatten_dict(flat)


def diffusers_key(path: tuple[str, ...]) -> str:
    """A diffusers state-dict key for our path in a module named after diffusers' (list indices joined
    with ``_``): ``("encoder", "down_blocks_0", "resnets_1", "conv1", "kernel")`` ->
    ``encoder.down_blocks.0.resnets.1.conv1.weight``."""
    *mods, leaf = path
    parts = [re.sub(r"_(\d+)$", r".\1", m) for m in mods]
    return ".".join(parts + [_LEAF[leaf]])


def convert_autoencoder_kl(state_dict: Mapping[str, Any], **arch) -> dict:
    """Params of ``ddim_jax.autoencoder.AutoencoderKL(**arch)`` from a diffusers ``AutoencoderKL`` state dict
    (torch tensors or arrays; e.g. Stable Diffusion's ``vae/diffusion_pytorch_model.safetensors`` with
    ``arch = autoencoder.SD_VAE``)."""
    from ddim_jax.autoencoder import AutoencoderKL

    model = AutoencoderKL(**arch)
    x = jnp.zeros((1, 8, 8, model.in_channels), jnp.float32)
    shapes = jax.eval_shape(lambda k: model.init(k, x)["params"], jax.random.key(0))
    sd = {k: _to_numpy(k, v) for k, v in state_dict.items()}
    return _map(sd, shapes, diffusers_key, "diffusers AutoencoderKL")


def convert_autoencoder_vq(state_dict: Mapping[str, Any], **arch) -> dict:
    """Params of ``ddim_jax.autoencoder.AutoencoderVQ(**arch)`` from a diffusers ``VQModel`` state dict."""
    from ddim_jax.autoencoder import AutoencoderVQ

    model = AutoencoderVQ(**arch)
    x = jnp.zeros((1, 8, 8, model.in_channels), jnp.float32)
    shapes = jax.eval_shape(lambda k: model.init(k, x)["params"], jax.random.key(0))
    sd = {k: _to_numpy(k, v) for k, v in state_dict.items()}
    return _map(sd, shapes, diffusers_key, "diffusers VQModel")


# ----------------------------------------------------------------------------------------------
# diffusers UNet2DModel

# UNet2DModel.__init__ defaults for the settings we check.
_DIFFUSERS_DEFAULTS = dict(
    in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type="positional",
    time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True, mid_block_type="UNetMidBlock2D",
    layers_per_block=2, mid_block_scale_factor=1, downsample_padding=1, downsample_type="conv",
    upsample_type="conv", dropout=0.0, act_fn="silu", attention_head_dim=8, norm_num_groups=32,
    attn_norm_num_groups=None, norm_eps=1e-5, resnet_time_scale_shift="default", add_attention=True,
    class_embed_type=None, num_class_embeds=None, sample_size=None,
)


def _diffusers_unet_kwargs(config: Mapping[str, Any], image_size: int | None,
                           where: str = "diffusers config") -> tuple[dict, int, int]:
    cls = config.get("_class_name", "UNet2DModel")
    if cls == "UNet2DConditionModel":
        raise ConversionError(f"{where}: a UNet2DConditionModel converts with the Stable Diffusion folder holding "
                              "it (unet/, vae/, scheduler/)")
    if cls != "UNet2DModel":
        raise ConversionError(f"{where}: _class_name is '{cls}', only 'UNet2DModel' is supported")
    _check_image_size(image_size)
    if "block_out_channels" not in config or "down_block_types" not in config or "up_block_types" not in config:
        raise ConversionError(f"{where}: needs block_out_channels, down_block_types and up_block_types")
    d = _DIFFUSERS_DEFAULTS
    c = {**d, **config}
    for key, allowed in (("block_out_channels", POSITIVE_INTS), ("down_block_types", NAMES),
                         ("up_block_types", NAMES), ("in_channels", POSITIVE_INT), ("out_channels", POSITIVE_INT),
                         ("layers_per_block", POSITIVE_INT), ("norm_eps", POSITIVE_NUMBER), ("dropout", DROPOUT),
                         ("norm_num_groups", POSITIVE_INT), ("attention_head_dim", OPTIONAL_POSITIVE_INT),
                         ("num_class_embeds", OPTIONAL_POSITIVE_INT)):
        config_value(config, key, d.get(key), allowed, where)
    if image_size is None and c["sample_size"] is not None:
        config_value(config, "sample_size", None, POSITIVE_INT_OR_LIST, where)

    def require(name: str, ok: bool, want: str) -> None:
        if not ok:
            raise ConversionError(f"{where}: {name}={c[name]!r} is not supported (DDPM's UNet needs {want})")

    require("time_embedding_type", c["time_embedding_type"] == "positional", "'positional'")
    require("flip_sin_to_cos", c["flip_sin_to_cos"] is False, "False")
    require("freq_shift", c["freq_shift"] == 1, "1")
    require("center_input_sample", c["center_input_sample"] is False, "False")
    require("act_fn", c["act_fn"] in ("silu", "swish"), "'silu'")
    require("norm_eps", math.isclose(float(c["norm_eps"]), 1e-6, rel_tol=1e-6), "1e-06")
    require("resnet_time_scale_shift", c["resnet_time_scale_shift"] == "default", "'default'")
    require("mid_block_type", c["mid_block_type"] == "UNetMidBlock2D", "'UNetMidBlock2D'")
    require("add_attention", c["add_attention"] is True, "True")
    require("mid_block_scale_factor", c["mid_block_scale_factor"] == 1, "1")
    require("downsample_padding", c["downsample_padding"] == 0, "0: DDPM pads bottom/right by one")
    require("downsample_type", c["downsample_type"] == "conv", "'conv'")
    require("upsample_type", c["upsample_type"] == "conv", "'conv'")
    require("class_embed_type", c["class_embed_type"] is None, "None")
    require("out_channels", c["out_channels"] == c["in_channels"],
            f"in_channels={c['in_channels']!r}: a model predicts eps, v or x0 for every input channel")

    chans = list(c["block_out_channels"])
    ch = chans[0]
    groups = c["norm_num_groups"]
    require("norm_num_groups", isinstance(groups, int) and groups >= 1 and all(v % groups == 0 for v in chans),
            "a positive integer dividing every block's channels")
    require("attn_norm_num_groups", c["attn_norm_num_groups"] in (None, groups), f"None or {groups}")
    require("time_embedding_dim", c["time_embedding_dim"] in (None, 4 * ch), f"None or {4 * ch}")
    require("block_out_channels", all(v % ch == 0 for v in chans), "multiples of block_out_channels[0]")
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    n = len(chans)
    require("down_block_types", len(down) == n and set(down) <= {"DownBlock2D", "AttnDownBlock2D"},
            f"{n} entries of 'DownBlock2D' / 'AttnDownBlock2D'")
    require("up_block_types", len(up) == n and set(up) <= {"UpBlock2D", "AttnUpBlock2D"},
            f"{n} entries of 'UpBlock2D' / 'AttnUpBlock2D'")
    attn_levels = [i for i, b in enumerate(down) if b == "AttnDownBlock2D"]
    require("up_block_types", [i for i in range(n) if up[n - 1 - i] == "AttnUpBlock2D"] == attn_levels,
            "attention at the same levels as down_block_types (reversed order)")
    head_dim = c["attention_head_dim"]
    attn_chans = {chans[i] for i in attn_levels} | {chans[-1]}
    require("attention_head_dim", head_dim is None or all(head_dim == a for a in attn_chans),
            "None: single-head attention")

    if image_size is None:
        size = c["sample_size"]
        if size is None:
            raise ConversionError(f"{where}: sample_size is missing; pass image_size (--image-size)")
        image_size = int(size[0] if isinstance(size, (list, tuple)) else size)
    kwargs = dict(
        ch=ch, out_ch=int(c["out_channels"]), ch_mult=tuple(v // ch for v in chans),
        num_res_blocks=int(c["layers_per_block"]),
        attn_resolutions=tuple(image_size // 2 ** i for i in attn_levels),
        dropout=float(c["dropout"]), resamp_with_conv=True, norm_groups=int(groups),
        num_classes=None if c["num_class_embeds"] is None else int(c["num_class_embeds"]),
    )
    return kwargs, image_size, int(c["in_channels"])


def diffusers_schedule(scheduler_config: Mapping[str, Any] | None,
                       where: str = "diffusers scheduler config") -> tuple[dict, str]:
    """Our schedule (a :class:`ModelSpec` schedule) and prediction type for a diffusers scheduler config.

    ``None`` (no scheduler config) gives DDPM's schedule and epsilon prediction. ``beta_schedule`` names are
    translated (:data:`DIFFUSERS_SCHEDULES`), ``trained_betas`` become a ``custom`` schedule,
    ``rescale_betas_zero_snr`` is ``rescale_zero_terminal_snr`` and ``prediction_type`` is translated by
    :data:`DIFFUSERS_PREDICTION_TYPES`; anything else is a :class:`ConversionError` naming ``where``.
    """
    if scheduler_config is None:
        return dict(DDPM_SCHEDULE), "epsilon"
    d = _DIFFUSERS_SCHEDULER_DEFAULTS
    c = {**d, **scheduler_config}
    for key, allowed in (("num_train_timesteps", TIMESTEPS), ("trained_betas", OPTIONAL_NUMBERS),
                         ("beta_start", NUMBER), ("beta_end", NUMBER), ("rescale_betas_zero_snr", BOOL)):
        config_value(scheduler_config, key, d[key], allowed, where)
    pred = c["prediction_type"]
    if pred not in DIFFUSERS_PREDICTION_TYPES:
        raise ConversionError(f"{where}: prediction_type={pred!r} is not supported; allowed: "
                              f"{', '.join(DIFFUSERS_PREDICTION_TYPES)}")
    T = c["num_train_timesteps"]
    if c["trained_betas"] is not None:
        betas = [float(b) for b in c["trained_betas"]]
        if "num_train_timesteps" in scheduler_config and T != len(betas):
            raise ConversionError(f"{where}: trained_betas has {len(betas)} values but num_train_timesteps={T!r}")
        schedule = {"name": "custom", "betas": betas}
    else:
        name = c["beta_schedule"]
        if name not in DIFFUSERS_SCHEDULES:
            raise ConversionError(f"{where}: beta_schedule={name!r} is not supported; allowed: "
                                  f"{', '.join(DIFFUSERS_SCHEDULES)} (or trained_betas)")
        schedule = {"name": DIFFUSERS_SCHEDULES[name], "num_timesteps": T}
        if name != "squaredcos_cap_v2":  # diffusers' cosine schedule ignores beta_start and beta_end
            schedule.update(beta_start=float(c["beta_start"]), beta_end=float(c["beta_end"]))
    if c["rescale_betas_zero_snr"]:
        schedule["rescale_zero_terminal_snr"] = True
    try:  # values make_schedule refuses (beta_end > 1, ...) fail here, naming the config
        args = dict(schedule)
        make_schedule(args.pop("name"), **args)
    except ValueError as e:
        raise ConversionError(f"{where}: {e}") from None
    return schedule, DIFFUSERS_PREDICTION_TYPES[pred]


def _spec(kwargs: Mapping[str, Any], image_size: int, channels: int, schedule: Mapping[str, Any],
          prediction_type: str, what: str) -> ModelSpec:
    """The spec of a converted UNet (``kwargs`` are UNet arguments; out_ch and num_classes are the spec's)."""
    arch = {k: v for k, v in kwargs.items() if k not in ("out_ch", "num_classes")}
    try:
        return ModelSpec("unet", arch, int(image_size), int(channels), schedule, prediction_type,
                         kwargs["num_classes"])
    except ValueError as e:
        raise ConversionError(f"{what}: {e}") from None


def convert_diffusers(state_dict: Mapping[str, Any], config: Mapping[str, Any], image_size: int | None = None,
                      scheduler_config: Mapping[str, Any] | None = None) -> tuple[ModelSpec, dict]:
    """Convert a diffusers ``UNet2DModel`` state dict and its config dict into ``(spec, params)``.

    ``scheduler_config`` (a diffusers scheduler's config dict) gives the schedule and prediction type,
    see :func:`diffusers_schedule`; without it they are DDPM's. Accepts both current attention key names
    (``to_q``/``to_k``/``to_v``/``to_out.0``) and the legacy ones (``query``/``key``/``value``/``proj_attn``)
    of the original google/ddpm-* uploads.
    """
    spec = diffusers_spec(config, image_size, scheduler_config)
    return spec, diffusers_params(state_dict, spec)


def diffusers_spec(config: Mapping[str, Any], image_size: int | None = None,
                   scheduler_config: Mapping[str, Any] | None = None, where: str = "diffusers config",
                   scheduler_where: str = "diffusers scheduler config") -> ModelSpec:
    """The spec of a diffusers ``UNet2DModel`` from its config dict (and its scheduler's); ``where`` and
    ``scheduler_where`` name them in errors."""
    schedule, prediction_type = diffusers_schedule(scheduler_config, scheduler_where)
    kwargs, image_size, channels = _diffusers_unet_kwargs(config, image_size, where)
    return _spec(kwargs, image_size, channels, schedule, prediction_type, where)


def diffusers_params(state_dict: Mapping[str, Any], spec: ModelSpec) -> dict:
    """The params of ``spec`` (a converted ``UNet2DModel``'s) from the diffusers state dict."""
    sd = {}
    for key, value in state_dict.items():
        m = _DIFFUSERS_LEGACY_ATTN.match(key)
        if m:
            key = f"{m[1]}.{_LEGACY_NAMES[m[2]]}.{m[3]}"
        sd[key] = _to_numpy(key, value)
    num_levels = len(spec.arch["ch_mult"])
    return _map(sd, spec.param_shapes(), lambda path: _ref_key(path, "diffusers", num_levels), "diffusers")


# ----------------------------------------------------------------------------------------------
# ermongroup/ddim Model


def _ddim_unet_kwargs(sd: Mapping[str, np.ndarray], image_size: int | None,
                      dropout: float | None) -> tuple[dict, int, int]:
    _check_image_size(image_size)
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


def convert_ddim(state_dict: Mapping[str, Any], image_size: int | None = None,
                 dropout: float | None = None) -> tuple[ModelSpec, dict]:
    """Convert an ermongroup/ddim ``Model`` state dict into ``(spec, params)`` (DDPM's schedule, epsilon).

    A ``module.`` prefix (DataParallel) is stripped. The architecture is read from the key names and
    shapes; ``image_size`` (needed to express attention levels in pixels) defaults to 16 px at the first
    attention level, as in all of DDPM's models. ``dropout`` defaults to that of the matching preset, else 0.
    The ``logvar`` entry of ermongroup's 'bayesian' model type is ignored.
    """
    sd, _ = _unwrap(state_dict, "state_dict")
    kwargs, image_size, channels = _ddim_unet_kwargs(sd, image_size, dropout)
    params = _map_params(sd, kwargs, image_size, channels, "ddim", ignore=("logvar",))
    return _spec(kwargs, image_size, channels, DDPM_SCHEDULE, "epsilon", "ddim model"), params


# ----------------------------------------------------------------------------------------------
# Files and the command line


def _find_diffusers_weights(src: str) -> tuple[str, str]:
    """(weights file, directory holding config.json) for a diffusers directory or weights file."""
    if os.path.isdir(src):
        if not os.path.isfile(os.path.join(src, "config.json")) and os.path.isfile(
                os.path.join(src, "unet", "config.json")):
            src = os.path.join(src, "unet")
        for name in _DIFFUSERS_WEIGHTS:
            if os.path.isfile(os.path.join(src, name)):
                return os.path.join(src, name), src
        raise ConversionError(f"no {' or '.join(_DIFFUSERS_WEIGHTS)} in {src}")
    return src, os.path.dirname(os.path.abspath(src))


def _detect_format(src: str) -> tuple[str, tuple[dict, str | None] | None]:
    """The format of ``src``, and for a file the (state dict, note) already read to find it."""
    if os.path.isdir(src):
        if any(os.path.isfile(os.path.join(d, "config.json")) for d in (src, os.path.join(src, "unet"))):
            return "diffusers", None
        raise ConversionError(f"cannot tell the format of directory {src}: no config.json (diffusers) found; "
                              "pass the weights file for the ddim format")
    loaded = read_state_dict(src)
    if "time_embedding.linear_1.weight" in loaded[0]:
        return "diffusers", loaded
    if "temb.dense.0.weight" in loaded[0]:
        return "ddim", loaded
    raise ConversionError(f"unrecognised checkpoint format in {src}: neither diffusers UNet2DModel keys "
                          "(time_embedding.linear_1.weight) nor ermongroup/ddim keys (temb.dense.0.weight); "
                          "pass --format")


def _find_scheduler_config(config_dir: str) -> str | None:
    """The diffusers scheduler_config.json beside the model or in its pipeline's scheduler/, if any."""
    for cand in (os.path.join(config_dir, "scheduler_config.json"),
                 os.path.join(config_dir, os.pardir, "scheduler", "scheduler_config.json")):
        if os.path.isfile(cand):
            return os.path.normpath(cand)
    return None


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            obj = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON ({_one_line(e)})") from None
    if not isinstance(obj, dict):
        raise ConversionError(f"{path} must hold a JSON object, not {type(obj).__name__}")
    return obj


def _check_destination(dst: str, overwrite: bool) -> None:
    """Fails early (before reading any weights) where :func:`ddim_jax.models.save` would refuse ``dst``.

    Nothing is deleted here: models.save swaps the new model directory in and only then removes the old one.
    """
    if not os.path.lexists(dst):
        return
    if not overwrite:
        raise FileExistsError(f"destination exists: {dst} (pass --overwrite / overwrite=True to replace it)")
    if not (os.path.isdir(dst) and (models.is_model_dir(dst) or not os.listdir(dst))):
        raise FileExistsError(f"destination exists and is not a model directory ({models.SPEC_FILE}); "
                              f"refusing to replace it: {dst}")


def convert(src: str | os.PathLike, dst: str | os.PathLike, fmt: str = "auto", overwrite: bool = False,
            image_size: int | None = None) -> ModelSpec:
    """Convert the checkpoint at ``src`` into the model directory ``dst``; returns the spec written.

    ``dst`` is written by :func:`ddim_jax.models.save`: an existing ``dst`` is replaced only with
    ``overwrite``, only if it is a model directory (or empty), and only once the new one is complete, so a
    failed conversion leaves it as it was. Load the result with :func:`ddim_jax.models.load`.
    """
    src = os.path.abspath(os.fspath(src))
    dst = os.path.abspath(os.fspath(dst))
    if not os.path.exists(src):
        raise FileNotFoundError(f"source not found: {src}")
    if fmt not in FORMATS:
        raise ConversionError(f"unknown format {fmt!r}: choose {', '.join(FORMATS)}")
    _check_destination(dst, overwrite)
    loaded = None
    if fmt == "auto" and os.path.isdir(src) and _is_sd_folder(src):
        fmt = "stable_diffusion"
    if fmt == "auto":
        fmt, loaded = _detect_format(src)
    source = {"path": src, "format": fmt, "entry": None}
    if fmt == "stable_diffusion":
        if not os.path.isdir(src):
            raise ConversionError(f"stable_diffusion format needs a folder (unet/, vae/, scheduler/), not a file: {src}")
        spec, params = convert_stable_diffusion(src)
    elif fmt == "diffusers":
        weights, config_dir = _find_diffusers_weights(src)
        config_path = os.path.join(config_dir, "config.json")
        if not os.path.isfile(config_path):
            raise ConversionError(f"diffusers format needs config.json beside the weights: {config_path} not found")
        unet_config = _read_json(config_path)
        scheduler_path = _find_scheduler_config(config_dir)
        scheduler_config = None if scheduler_path is None else _read_json(scheduler_path)
        spec = diffusers_spec(unet_config, image_size, scheduler_config, config_path, scheduler_path)
        sd, _ = loaded or read_state_dict(weights)
        params = diffusers_params(sd, spec)
    else:
        if os.path.isdir(src):
            raise ConversionError(f"ddim format needs a weights file, got a directory: {src}")
        sd, source["entry"] = loaded or read_state_dict(src)
        spec, params = convert_ddim(sd, image_size)
    spec = dataclasses.replace(spec, info={"source": source})
    models.save(dst, spec, params, overwrite=overwrite)
    return spec


def _describe(spec: ModelSpec) -> str:
    """The spec as one line of JSON, a custom schedule's betas abbreviated."""
    d = spec.to_dict()
    if "betas" in d["schedule"]:
        d["schedule"]["betas"] = f"<{len(d['schedule']['betas'])} values>"
    return json.dumps(d, sort_keys=True)


def _cond_unet_key(path: tuple[str, ...]) -> str:
    # ``time_embedding.linear_1`` is a name, not a list index.
    return re.sub(r"^time_embedding\.linear\.(\d)\.", r"time_embedding.linear_\1.", diffusers_key(path))


def convert_unet2d_condition(state_dict: Mapping[str, Any], **arch) -> dict:
    """Params of ``ddim_jax.cond_unet.UNet2DCondition(**arch)`` from a diffusers ``UNet2DConditionModel``
    state dict (e.g. Stable Diffusion's ``unet/diffusion_pytorch_model.safetensors`` with
    ``arch = cond_unet.SD15``)."""
    from ddim_jax.cond_unet import UNet2DCondition

    model = UNet2DCondition(**arch)
    n = len(model.block_out_channels)
    x = jnp.zeros((1, 2 ** (n + 1), 2 ** (n + 1), model.in_channels), jnp.float32)
    ctx = jnp.zeros((1, 1, model.cross_attention_dim), jnp.float32)
    y = None if model.num_class_embeds is None else jnp.zeros((1,), jnp.int32)
    shapes = jax.eval_shape(lambda k: model.init(k, x, jnp.zeros((1,)), ctx, y)["params"], jax.random.key(0))
    sd = {k: _to_numpy(k, v) for k, v in state_dict.items()}
    return _map(sd, shapes, _cond_unet_key, "diffusers UNet2DConditionModel")


# ----------------------------------------------------------------------------------------------
# Stable Diffusion folders (diffusers' pipeline layout: unet/, vae/, scheduler/)

# UNet2DConditionModel settings this UNet2DCondition does not implement, with the values it does.
_SD_UNET_FIXED = {"act_fn": "silu", "center_input_sample": False, "class_embed_type": None,
                  "addition_embed_type": None, "num_class_embeds": None, "time_embedding_type": "positional",
                  "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
                  "dual_cross_attention": False, "resnet_time_scale_shift": "default", "conv_in_kernel": 3,
                  "conv_out_kernel": 3, "encoder_hid_dim": None, "time_cond_proj_dim": None,
                  "class_embeddings_concat": False, "attention_type": "default", "time_embedding_dim": None,
                  "timestep_post_act": None, "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
                  "mid_block_scale_factor": 1, "downsample_padding": 1, "cross_attention_norm": None}
_SD_VAE_FIXED = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True,
                 "mid_block_add_attention": True, "shift_factor": None, "latents_mean": None, "latents_std": None}


def _sd_fixed(config: Mapping[str, Any], fixed: Mapping[str, Any], where: str) -> None:
    for k, v in fixed.items():
        if k in config and config[k] != v and not (v is False and config[k] in ([False], None)):
            raise ConversionError(f"{where}: {k}={config[k]!r} is not supported (ddim_jax implements {k}={v!r})")


def convert_stable_diffusion(folder: str | os.PathLike) -> tuple[ModelSpec, dict]:
    """``(spec, params)`` of the latent diffusion model in a local diffusers Stable Diffusion 1.x/2.x folder:
    ``unet/`` (a ``UNet2DConditionModel``) and ``vae/`` (an ``AutoencoderKL``), each a ``config.json`` and
    its weights (safetensors: no torch needed), and ``scheduler/scheduler_config.json`` (the schedule and
    prediction type; without it DDPM's). The spec is a ``unet2d_condition`` model over the VAE's latents,
    scaled by the VAE's ``scaling_factor`` (0.18215 for SD 1.x); sample it with given text-encoder outputs
    (``spec.eps_fn(params, context, guidance, null_context=...)``; no text encoder ships)."""
    folder = os.fspath(folder)
    missing = [n + "/config.json" for n in ("unet", "vae") if not os.path.isfile(os.path.join(folder, n, "config.json"))]
    if missing:
        has = [n + "/" for n in ("unet", "vae", "scheduler") if os.path.isdir(os.path.join(folder, n))]
        raise ConversionError(f"Stable Diffusion folder {folder} has {', '.join(has) or 'no unet/ or vae/'} but no "
                              f"{' or '.join(missing)} (it needs unet/ and vae/, each a config.json and its weights)")
    parts = {}
    for name in ("unet", "vae"):
        weights, config_dir = _find_diffusers_weights(os.path.join(folder, name))
        config_path = os.path.join(config_dir, "config.json")
        parts[name] = (_read_json(config_path), weights, config_path)
    (uc, unet_weights, unet_where), (vc, vae_weights, vae_where) = parts["unet"], parts["vae"]
    _sd_fixed(uc, _SD_UNET_FIXED, unet_where)
    _sd_fixed(vc, _SD_VAE_FIXED, vae_where)

    def u(key, default, allowed):
        return config_value(uc, key, default, allowed, unet_where)

    def v(key, default, allowed):
        return config_value(vc, key, default, allowed, vae_where)

    for k, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if any(b != block for b in v(k, [block], NAMES)):
            raise ConversionError(f"{vae_where}: {k}={vc[k]!r} is not supported (only {block})")
    if v("out_channels", 3, POSITIVE_INT) != v("in_channels", 3, POSITIVE_INT):
        raise ConversionError(f"{vae_where}: in_channels and out_channels must be equal")
    for k in ("block_out_channels", "down_block_types", "up_block_types"):
        if k not in uc:
            raise ConversionError(f"{unet_where}: the field {k} is missing")
    heads_key = "num_attention_heads" if uc.get("num_attention_heads") is not None else "attention_head_dim"
    arch = dict(block_out_channels=tuple(u("block_out_channels", None, POSITIVE_INTS)),
                down_block_types=tuple(u("down_block_types", None, NAMES)),
                up_block_types=tuple(u("up_block_types", None, NAMES)),
                layers_per_block=u("layers_per_block", 2, POSITIVE_INT),
                attention_head_dim=_tuple_or_int(u(heads_key, 8, POSITIVE_INT_OR_LIST)),
                transformer_layers_per_block=_tuple_or_int(u("transformer_layers_per_block", 1, POSITIVE_INT_OR_LIST)),
                cross_attention_dim=u("cross_attention_dim", 1280, POSITIVE_INT),
                norm_groups=u("norm_num_groups", 32, POSITIVE_INT), norm_eps=float(u("norm_eps", 1e-5, POSITIVE_NUMBER)),
                use_linear_projection=u("use_linear_projection", False, BOOL),
                flip_sin_to_cos=u("flip_sin_to_cos", True, BOOL), freq_shift=float(u("freq_shift", 0, NUMBER)))
    ae_arch = dict(block_out_channels=tuple(v("block_out_channels", (64,), POSITIVE_INTS)),
                   layers_per_block=v("layers_per_block", 1, POSITIVE_INT),
                   latent_channels=v("latent_channels", 4, POSITIVE_INT),
                   norm_groups=v("norm_num_groups", 32, POSITIVE_INT))
    scale = float(v("scaling_factor", 0.18215, POSITIVE_NUMBER))
    ae_size, ae_channels = v("sample_size", 512, POSITIVE_INT), v("in_channels", 3, POSITIVE_INT)
    try:
        ae = ModelSpec("autoencoder_kl", ae_arch, ae_size, ae_channels, None, None)
        size, latent_ch = ae.latent_shape
    except ValueError as e:
        raise ConversionError(f"{vae_where}: {e}") from None
    for k in ("in_channels", "out_channels"):
        if u(k, 4, POSITIVE_INT) != latent_ch:
            raise ConversionError(f"{unet_where}: {k}={uc.get(k, 4)} but the VAE's latents have {latent_ch} channels")
    sched_path = os.path.join(folder, "scheduler", "scheduler_config.json")
    sched = _read_json(sched_path) if os.path.isfile(sched_path) else None
    schedule, prediction_type = diffusers_schedule(sched, sched_path)
    try:
        spec = ModelSpec("unet2d_condition", arch, size, latent_ch, schedule, prediction_type, autoencoder=ae,
                         scale_factor=scale)
    except ValueError as e:
        raise ConversionError(f"{unet_where}: {e}") from None
    net_arch = dict(arch, in_channels=latent_ch, out_channels=latent_ch)
    params = {"denoiser": convert_unet2d_condition(read_state_dict(unet_weights)[0], **net_arch),
              "autoencoder": convert_autoencoder_kl(read_state_dict(vae_weights)[0], in_channels=ae.channels,
                                                    **ae_arch)}
    return spec, params


def _tuple_or_int(value: int | list) -> int | tuple:
    return tuple(value) if isinstance(value, list) else value


def _is_sd_folder(src: str) -> bool:
    """A folder in diffusers' pipeline layout holding a VAE or a UNet2DConditionModel."""
    unet = os.path.join(src, "unet", "config.json")
    if os.path.isdir(os.path.join(src, "vae")):
        return True
    try:
        return os.path.isfile(unet) and _read_json(unet).get("_class_name") == "UNet2DConditionModel"
    except ConversionError:
        return False



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddim_jax.convert",
                                     description="Convert a DDPM/DDIM PyTorch checkpoint (local files) to a "
                                                 "ddim_jax model directory.")
    parser.add_argument("src", help="diffusers UNet2DModel directory / weights file, a diffusers Stable Diffusion "
                                    "folder (unet/, vae/, scheduler/), or an ermongroup/ddim .ckpt/.pth")
    parser.add_argument("dst", help=f"output model directory ({models.SPEC_FILE} + {models.PARAMS_FILE})")
    parser.add_argument("--format", default="auto", choices=FORMATS)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model directory at DST")
    parser.add_argument("--image-size", type=int, default=None,
                        help="training image size (default: diffusers sample_size; ddim: 16 px at the first "
                             "attention level)")
    args = parser.parse_args(argv)
    try:
        spec = convert(args.src, args.dst, args.format, args.overwrite, args.image_size)
    except (ConversionError, FloatingPointError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = count_params(spec.param_shapes())
    print(f"converted {spec.info['source']['format']} checkpoint {spec.info['source']['path']} -> "
          f"{os.path.abspath(args.dst)}: {n:,} params")
    print(f"spec: {_describe(spec)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

