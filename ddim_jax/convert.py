"""Convert published DDPM/DDIM PyTorch checkpoints into params of ``ddim_jax.unet.UNet``.

Two source formats, read from local files only:

- ``diffusers``: a ``UNet2DModel`` directory (``config.json`` and ``diffusion_pytorch_model.safetensors``
  or ``.bin``), as in google/ddpm-cifar10-32, ddpm-celebahq-256 and ddpm-church-256. A pipeline directory
  with a ``unet/`` subfolder works too. Beta values come from ``scheduler_config.json`` when it is present.
- ``ddim``: a state dict of the ``Model`` in ermongroup/ddim ``models/diffusion.py`` (pesser's converted
  DDPM checkpoints, ``.ckpt``/``.pth``), a training checkpoint list whose index 4 holds the EMA weights,
  or a DataParallel state dict (``module.`` prefix).

Command line::

    python -m ddim_jax.convert SRC DST [--format auto|diffusers|ddim] [--overwrite] [--image-size N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ddim_jax.checkpoint_io import load_converted, save_converted
from ddim_jax.unet import PRESETS, UNet, count_params, param_shapes

__all__ = ["ConversionError", "convert_diffusers", "convert_ddim", "convert", "load_converted",
           "read_state_dict", "DDPM_DIFFUSION"]

# DDPM's noise schedule, used by every checkpoint of the paper.
DDPM_DIFFUSION = {"schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "num_timesteps": 1000}

_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the offending key or setting."""


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


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], str | None]:
    """Read a weights file into {key: float32/int numpy array}; returns it and a note on the entry taken.

    ``.safetensors`` needs only ``safetensors``; ``.bin``/``.ckpt``/``.pth``/``.pt`` need ``torch``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return _unwrap(load_file(path), path)
    try:
        import torch
    except ImportError:
        raise ImportError(f"reading {os.path.basename(path)} needs the 'torch' package (pip install torch); "
                          ".safetensors files do not") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the path
        raise ConversionError(f"cannot read {path} with torch.load(weights_only=True): {e}") from e
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
    """Build our params from ``state_dict``; raises ConversionError on missing/unexpected keys or bad shapes."""
    shapes = traverse_util.flatten_dict(param_shapes(UNet(**unet_kwargs), image_size, channels))
    num_levels = len(unet_kwargs["ch_mult"])
    flat, used, missing, mismatched = {}, set(), [], []
    for path, spec in shapes.items():
        key, leaf, expected = _ref_key(path, fmt, num_levels), path[-1], tuple(spec.shape)
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
        flat[path] = jnp.asarray(_to_flax(value, leaf, expected), dtype=jnp.float32)
    unexpected = [f"unexpected key '{k}' with shape {tuple(np.shape(v))}" for k, v in state_dict.items()
                  if k not in used and k not in ignore]
    problems = missing + unexpected + mismatched
    if problems:
        more = f" (and {len(problems) - 1} more: {len(missing)} missing, {len(unexpected)} unexpected, " \
               f"{len(mismatched)} shape mismatches)" if len(problems) > 1 else ""
        raise ConversionError(f"{fmt} checkpoint: {problems[0]}{more}")
    return traverse_util.unflatten_dict(flat)


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


def _diffusers_unet_kwargs(config: Mapping[str, Any], image_size: int | None) -> tuple[dict, int, int]:
    cls = config.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise ConversionError(f"diffusers config: _class_name is '{cls}', only 'UNet2DModel' is supported")
    c = {**_DIFFUSERS_DEFAULTS, **config}
    if "block_out_channels" not in config or "down_block_types" not in config or "up_block_types" not in config:
        raise ConversionError("diffusers config: needs block_out_channels, down_block_types and up_block_types")

    def require(name: str, ok: bool, want: str) -> None:
        if not ok:
            raise ConversionError(f"diffusers config: {name}={c[name]!r} is not supported (DDPM's UNet needs {want})")

    require("time_embedding_type", c["time_embedding_type"] == "positional", "'positional'")
    require("flip_sin_to_cos", c["flip_sin_to_cos"] is False, "False")
    require("freq_shift", c["freq_shift"] == 1, "1")
    require("center_input_sample", c["center_input_sample"] is False, "False")
    require("act_fn", c["act_fn"] in ("silu", "swish"), "'silu'")
    require("norm_num_groups", c["norm_num_groups"] == 32, "32")
    require("attn_norm_num_groups", c["attn_norm_num_groups"] in (None, 32), "None or 32")
    require("norm_eps", math.isclose(float(c["norm_eps"]), 1e-6, rel_tol=1e-6), "1e-06")
    require("resnet_time_scale_shift", c["resnet_time_scale_shift"] == "default", "'default'")
    require("mid_block_type", c["mid_block_type"] == "UNetMidBlock2D", "'UNetMidBlock2D'")
    require("add_attention", c["add_attention"] is True, "True")
    require("mid_block_scale_factor", c["mid_block_scale_factor"] == 1, "1")
    require("downsample_padding", c["downsample_padding"] == 0, "0: DDPM pads bottom/right by one")
    require("downsample_type", c["downsample_type"] == "conv", "'conv'")
    require("upsample_type", c["upsample_type"] == "conv", "'conv'")
    require("class_embed_type", c["class_embed_type"] is None, "None")

    chans = [int(v) for v in c["block_out_channels"]]
    ch = chans[0]
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
            raise ConversionError("diffusers config: sample_size is missing; pass image_size (--image-size)")
        image_size = int(size[0] if isinstance(size, (list, tuple)) else size)
    kwargs = dict(
        ch=ch, out_ch=int(c["out_channels"]), ch_mult=tuple(v // ch for v in chans),
        num_res_blocks=int(c["layers_per_block"]),
        attn_resolutions=tuple(image_size // 2 ** i for i in attn_levels),
        dropout=float(c["dropout"]), resamp_with_conv=True,
        num_classes=None if c["num_class_embeds"] is None else int(c["num_class_embeds"]),
    )
    return kwargs, image_size, int(c["in_channels"])


def convert_diffusers(state_dict: Mapping[str, Any], config: Mapping[str, Any],
                      image_size: int | None = None) -> tuple[dict, dict]:
    """Convert a diffusers ``UNet2DModel`` state dict and its config dict into (UNet kwargs, params).

    Accepts both current attention key names (``to_q``/``to_k``/``to_v``/``to_out.0``) and the legacy ones
    (``query``/``key``/``value``/``proj_attn``) of the original google/ddpm-* uploads.
    """
    kwargs, image_size, channels = _diffusers_unet_kwargs(config, image_size)
    sd = {}
    for key, value in state_dict.items():
        m = _DIFFUSERS_LEGACY_ATTN.match(key)
        if m:
            key = f"{m[1]}.{_LEGACY_NAMES[m[2]]}.{m[3]}"
        sd[key] = _to_numpy(key, value)
    return kwargs, _map_params(sd, kwargs, image_size, channels, "diffusers")


# ----------------------------------------------------------------------------------------------
# ermongroup/ddim Model


def _ddim_unet_kwargs(sd: Mapping[str, np.ndarray], image_size: int | None,
                      dropout: float | None) -> tuple[dict, int, int]:
    for key in ("conv_in.weight", "conv_out.weight", "temb.dense.0.weight"):
        if key not in sd:
            raise ConversionError(f"ddim checkpoint: missing key '{key}' (not an ermongroup/ddim Model state dict?)")
    ch, channels = (int(v) for v in sd["conv_in.weight"].shape[:2])
    out_ch = int(sd["conv_out.weight"].shape[0])
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
                  resamp_with_conv=resamp_with_conv, num_classes=None)
    if dropout is None:
        dropout = next((p["dropout"] for p in PRESETS.values()
                        if {**p, "dropout": 0.0} == kwargs), 0.0)
    kwargs["dropout"] = float(dropout)
    return kwargs, image_size, channels


def convert_ddim(state_dict: Mapping[str, Any], image_size: int | None = None,
                 dropout: float | None = None) -> tuple[dict, dict]:
    """Convert an ermongroup/ddim ``Model`` state dict into (UNet kwargs, params).

    A ``module.`` prefix (DataParallel) is stripped. The architecture is read from the key names and
    shapes; ``image_size`` (needed to express attention levels in pixels) defaults to 16 px at the first
    attention level, as in all of DDPM's models. ``dropout`` defaults to that of the matching preset, else 0.
    The ``logvar`` entry of ermongroup's 'bayesian' model type is ignored.
    """
    sd, _ = _unwrap(state_dict, "state_dict")
    kwargs, image_size, channels = _ddim_unet_kwargs(sd, image_size, dropout)
    return kwargs, _map_params(sd, kwargs, image_size, channels, "ddim", ignore=("logvar",))


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


def _read_diffusion(config_dir: str) -> dict:
    """The noise schedule from a diffusers scheduler_config.json beside the model, else DDPM's."""
    for cand in (os.path.join(config_dir, "scheduler_config.json"),
                 os.path.join(config_dir, os.pardir, "scheduler", "scheduler_config.json")):
        if os.path.isfile(cand):
            with open(cand) as f:
                sched = json.load(f)
            pred = sched.get("prediction_type", "epsilon")
            if pred != "epsilon":
                raise ConversionError(f"{cand}: prediction_type={pred!r}; only 'epsilon' models are supported")
            out = {"schedule": sched.get("beta_schedule", "linear"),
                   "beta_start": float(sched.get("beta_start", DDPM_DIFFUSION["beta_start"])),
                   "beta_end": float(sched.get("beta_end", DDPM_DIFFUSION["beta_end"])),
                   "num_timesteps": int(sched.get("num_train_timesteps", DDPM_DIFFUSION["num_timesteps"]))}
            if sched.get("trained_betas") is not None:
                out["trained_betas"] = [float(b) for b in sched["trained_betas"]]
            return out
    return dict(DDPM_DIFFUSION)


def convert(src: str | os.PathLike, dst: str | os.PathLike, fmt: str = "auto", overwrite: bool = False,
            image_size: int | None = None) -> dict:
    """Convert the checkpoint at ``src`` and write it to ``dst``; returns the config written."""
    src = os.path.abspath(os.fspath(src))
    if not os.path.exists(src):
        raise FileNotFoundError(f"source not found: {src}")
    if fmt not in ("auto", "diffusers", "ddim"):
        raise ConversionError(f"unknown format {fmt!r}: choose auto, diffusers or ddim")
    if os.path.lexists(dst) and not overwrite:
        raise FileExistsError(f"destination exists: {os.path.abspath(dst)} (pass --overwrite to replace it)")
    loaded = None
    if fmt == "auto":
        fmt, loaded = _detect_format(src)
    source = {"path": src, "format": fmt}
    if fmt == "diffusers":
        weights, config_dir = _find_diffusers_weights(src)
        config_path = os.path.join(config_dir, "config.json")
        if not os.path.isfile(config_path):
            raise ConversionError(f"diffusers format needs config.json beside the weights: {config_path} not found")
        with open(config_path) as f:
            unet_config = json.load(f)
        sd, _ = loaded or read_state_dict(weights)
        kwargs, params = convert_diffusers(sd, unet_config, image_size)
        image_size = image_size or _diffusers_unet_kwargs(unet_config, None)[1]
        channels = int(unet_config.get("in_channels", 3))
        diffusion = _read_diffusion(config_dir)
    else:
        if os.path.isdir(src):
            raise ConversionError(f"ddim format needs a weights file, got a directory: {src}")
        sd, note = loaded or read_state_dict(src)
        if note:
            source["entry"] = note
        kwargs, image_size, channels = _ddim_unet_kwargs(sd, image_size, None)
        kwargs, params = convert_ddim(sd, image_size)
        diffusion = dict(DDPM_DIFFUSION)
    config = {"model": kwargs, "diffusion": diffusion, "image_size": int(image_size), "channels": channels,
              "source": source}
    save_converted(dst, config, params, overwrite=overwrite)
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddim_jax.convert",
                                     description="Convert a DDPM/DDIM PyTorch checkpoint (local files) to ddim_jax.")
    parser.add_argument("src", help="diffusers UNet2DModel directory / weights file, or ermongroup/ddim .ckpt/.pth")
    parser.add_argument("dst", help="output directory (config.json + orbax params/)")
    parser.add_argument("--format", default="auto", choices=("auto", "diffusers", "ddim"))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing converted checkpoint at DST")
    parser.add_argument("--image-size", type=int, default=None,
                        help="training image size (default: diffusers sample_size; ddim: 16 px at the first "
                             "attention level)")
    args = parser.parse_args(argv)
    try:
        config = convert(args.src, args.dst, args.format, args.overwrite, args.image_size)
    except (ConversionError, FileExistsError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = count_params(param_shapes(UNet(**config["model"]), config["image_size"], config["channels"]))
    print(f"converted {config['source']['format']} checkpoint {config['source']['path']} -> "
          f"{os.path.abspath(args.dst)}: {n:,} params, image_size {config['image_size']}, "
          f"model {json.dumps(config['model'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
