"""The ``diffusers`` format: a ``UNet2DModel`` (google/ddpm-cifar10-32, ddpm-celebahq-256, ddpm-church-256):
its ``config.json`` -> a ``unet`` spec, its state dict -> that spec's params."""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

from ddim_jax import kinds
from ddim_jax.convert.common import (DIFFUSERS_VERSION, DROPOUT, NAMES, OPTIONAL_POSITIVE_INT, POSITIVE_INT,
                                     POSITIVE_INT_OR_LIST, POSITIVE_INTS, POSITIVE_NUMBER, check_image_size,
                                     config_value, map_params, unet_key, unet_spec)
from ddim_jax.convert.scheduler import diffusers_schedule
from ddim_jax.models import ModelSpec
from ddim_jax.state_dicts import ConversionError

# Our UNet's top modules -> diffusers' (n: the number of levels; diffusers numbers up blocks from the bottom).
_TOP = [
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
_SUB = {"temb_proj": "time_emb_proj", "nin_shortcut": "conv_shortcut", "norm": "group_norm",
        "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LEGACY_ATTN = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def unet2d_key(path: tuple[str, ...], num_levels: int) -> str:
    """The diffusers ``UNet2DModel`` key of our UNet param ``path`` (a UNet of ``num_levels`` levels)."""
    return unet_key(path, _TOP, _SUB, num_levels, "diffusers")


def unet2d_pointwise(key: str) -> bool:
    """Whether a ``UNet2DModel`` key holds a 1x1 convolution where our UNet has a dense kernel (``nin_shortcut``)."""
    return key.endswith(".conv_shortcut.weight")


def unet2d_aliases(state_dict: Mapping[str, Any]) -> dict:
    """A ``UNet2DModel`` state dict with the legacy attention names of the original google/ddpm-* uploads
    (``query``/``key``/``value``/``proj_attn``) renamed to the current ones (``to_q``/.../``to_out.0``)."""
    out = {}
    for key, value in state_dict.items():
        m = _LEGACY_ATTN.match(key)
        out[f"{m[1]}.{_LEGACY_NAMES[m[2]]}.{m[3]}" if m else key] = value
    return out


def unet2d_config(spec: ModelSpec) -> dict:
    """The diffusers ``UNet2DModel`` config (``config.json``) of a pixel ``unet`` model: the inverse of
    :func:`diffusers_spec` (a class-conditional model's null label is class embedding ``num_classes``). What
    UNet2DModel cannot express is a one-line :class:`ConversionError` naming the field."""
    if spec.kind != "unet":
        raise ConversionError(f"a UNet2DModel config is written for kind unet, not {spec.kind}")
    if spec.autoencoder is not None:
        raise ConversionError("a latent unet model (autoencoder set) has no diffusers counterpart: UNet2DModel "
                              "pipelines diffuse pixels")
    if spec.concat is not None:
        raise ConversionError(f"unet concat={spec.concat!r} has no diffusers counterpart (a UNet2DModel predicts "
                              "for all of its input channels)")
    a = kinds.get("unet").full_arch(spec.arch)
    if not a["resamp_with_conv"]:
        raise ConversionError("unet resamp_with_conv=False has no diffusers counterpart (UNet2DModel resamples "
                              "with convolutions)")
    n = len(a["ch_mult"])
    attn = [spec.image_size // 2 ** i in a["attn_resolutions"] for i in range(n)]
    return {"_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION, "sample_size": spec.image_size,
            "in_channels": spec.channels, "out_channels": spec.channels, "center_input_sample": False,
            "time_embedding_type": "positional", "freq_shift": 1, "flip_sin_to_cos": False,
            "down_block_types": ["AttnDownBlock2D" if x else "DownBlock2D" for x in attn],
            "up_block_types": ["AttnUpBlock2D" if x else "UpBlock2D" for x in reversed(attn)],
            "block_out_channels": [a["ch"] * m for m in a["ch_mult"]], "layers_per_block": a["num_res_blocks"],
            "mid_block_scale_factor": 1, "downsample_padding": 0, "downsample_type": "conv", "upsample_type": "conv",
            "dropout": float(a["dropout"]), "act_fn": "silu", "attention_head_dim": None,
            "norm_num_groups": a["norm_groups"], "attn_norm_num_groups": None, "norm_eps": 1e-6,
            "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
            "num_class_embeds": spec.num_labels}


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
    check_image_size(image_size)
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


def diffusers_spec(config: Mapping[str, Any], image_size: int | None = None,
                   scheduler_config: Mapping[str, Any] | None = None, where: str = "diffusers config",
                   scheduler_where: str = "diffusers scheduler config") -> ModelSpec:
    """The spec of a diffusers ``UNet2DModel`` from its config dict (and its scheduler's); ``where`` and
    ``scheduler_where`` name them in errors."""
    schedule, prediction_type = diffusers_schedule(scheduler_config, scheduler_where)
    kwargs, image_size, channels = _diffusers_unet_kwargs(config, image_size, where)
    return unet_spec(kwargs, image_size, channels, schedule, prediction_type, where)


def diffusers_params(state_dict: Mapping[str, Any], spec: ModelSpec) -> dict:
    """The params of ``spec`` (a converted ``UNet2DModel``'s) from the diffusers state dict."""
    num_levels = len(spec.arch["ch_mult"])
    return map_params(unet2d_aliases(state_dict), spec.param_shapes(), lambda path: unet2d_key(path, num_levels),
                      "diffusers")


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
