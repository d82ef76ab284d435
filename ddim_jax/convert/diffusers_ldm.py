"""diffusers' latent diffusion classes and ours: ``UNet2DConditionModel`` (kind ``unet2d_condition``),
``AutoencoderKL`` (``autoencoder_kl``) and ``VQModel`` (``autoencoder_vq``): the key map, each class's
``config.json`` read into a spec, and a spec written back as one."""

from __future__ import annotations

import re
from typing import Any, Mapping

from ddim_jax import kinds
from ddim_jax.convert.common import (BOOL, DIFFUSERS_VERSION, NAMES, NUMBER, POSITIVE_INT, POSITIVE_INT_OR_LIST,
                                     POSITIVE_INTS, POSITIVE_NUMBER, config_value, diffusers_key)
from ddim_jax.convert.scheduler import DDPM_SCHEDULE
from ddim_jax.models import ModelSpec
from ddim_jax.state_dicts import ConversionError


def cond_unet_key(path: tuple[str, ...]) -> str:
    """The diffusers ``UNet2DConditionModel`` key of our ``UNet2DCondition`` param ``path``."""
    # ``time_embedding.linear_1`` is a name, not a list index.
    return re.sub(r"^time_embedding\.linear\.(\d)\.", r"time_embedding.linear_\1.", diffusers_key(path))


# UNet2DConditionModel settings this UNet2DCondition does not implement, with the values it does.
SD_UNET_FIXED = {"act_fn": "silu", "center_input_sample": False, "class_embed_type": None,
                 "addition_embed_type": None, "num_class_embeds": None, "time_embedding_type": "positional",
                 "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
                 "dual_cross_attention": False, "resnet_time_scale_shift": "default", "conv_in_kernel": 3,
                 "conv_out_kernel": 3, "encoder_hid_dim": None, "time_cond_proj_dim": None,
                 "class_embeddings_concat": False, "attention_type": "default", "time_embedding_dim": None,
                 "timestep_post_act": None, "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
                 "mid_block_scale_factor": 1, "downsample_padding": 1, "cross_attention_norm": None}
SD_VAE_FIXED = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True,
                "mid_block_add_attention": True, "shift_factor": None, "latents_mean": None, "latents_std": None}
_VQ_FIXED = {"act_fn": "silu", "norm_type": "group", "mid_block_add_attention": True, "lookup_from_codebook": False}
VQ_BETA = 0.25  # diffusers' VQModel builds its quantizer with this commitment weight


def check_fixed(config: Mapping[str, Any], fixed: Mapping[str, Any], where: str) -> None:
    """Each of ``fixed``'s settings present in ``config`` has the value ddim_jax implements, or a one-line error."""
    for k, v in fixed.items():
        if k in config and config[k] != v and not (v is False and config[k] in ([False], None)):
            raise ConversionError(f"{where}: {k}={config[k]!r} is not supported (ddim_jax implements {k}={v!r})")


def _tuple_or_int(value: int | list) -> int | tuple:
    return tuple(value) if isinstance(value, list) else value


def _spec(where: str, *args, **kwargs) -> ModelSpec:
    try:
        return ModelSpec(*args, **kwargs)
    except ValueError as e:
        raise ConversionError(f"{where}: {e}") from None


def cond_unet_spec(config: Mapping[str, Any], where: str = "UNet2DConditionModel config") -> ModelSpec:
    """The ``unet2d_condition`` spec of a ``UNet2DConditionModel`` config over its own ``sample_size`` with
    DDPM's schedule (a Stable Diffusion folder sets its VAE's latents and its scheduler's schedule); an
    ``in_channels`` of ``2 * out_channels + 1`` is an inpainting UNet (concat ``sd_inpaint``)."""
    check_fixed(config, SD_UNET_FIXED, where)

    def u(key, default, allowed):
        return config_value(config, key, default, allowed, where)

    for k in ("block_out_channels", "down_block_types", "up_block_types"):
        if k not in config:
            raise ConversionError(f"{where}: the field {k} is missing")
    heads_key = "num_attention_heads" if config.get("num_attention_heads") is not None else "attention_head_dim"
    arch = dict(block_out_channels=tuple(u("block_out_channels", None, POSITIVE_INTS)),
                down_block_types=tuple(u("down_block_types", None, NAMES)),
                up_block_types=tuple(u("up_block_types", None, NAMES)),
                layers_per_block=u("layers_per_block", 2, POSITIVE_INT),
                attention_head_dim=_tuple_or_int(u(heads_key, 8, POSITIVE_INT_OR_LIST)),
                transformer_layers_per_block=_tuple_or_int(u("transformer_layers_per_block", 1, POSITIVE_INT_OR_LIST)),
                cross_attention_dim=u("cross_attention_dim", 1280, POSITIVE_INT),
                norm_groups=u("norm_num_groups", 32, POSITIVE_INT),
                norm_eps=float(u("norm_eps", 1e-5, POSITIVE_NUMBER)),
                use_linear_projection=u("use_linear_projection", False, BOOL),
                flip_sin_to_cos=u("flip_sin_to_cos", True, BOOL), freq_shift=float(u("freq_shift", 0, NUMBER)))
    out_ch, in_ch = u("out_channels", 4, POSITIVE_INT), u("in_channels", 4, POSITIVE_INT)
    if in_ch not in (out_ch, 2 * out_ch + 1):  # an inpainting UNet also takes the mask and the masked image's latents
        raise ConversionError(f"{where}: in_channels={in_ch} but out_channels={out_ch} (allowed: {out_ch}, or "
                              f"{2 * out_ch + 1} for an inpainting UNet)")
    size = u("sample_size", 64, POSITIVE_INT_OR_LIST)
    size = size[0] if isinstance(size, (list, tuple)) else size
    return _spec(where, "unet2d_condition", arch, size, out_ch, dict(DDPM_SCHEDULE), "epsilon",
                 concat=None if in_ch == out_ch else "sd_inpaint")


def _autoencoder_arch(config: Mapping[str, Any], where: str) -> dict:
    def v(key, default, allowed):
        return config_value(config, key, default, allowed, where)

    for k, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if any(b != block for b in v(k, [block], NAMES)):
            raise ConversionError(f"{where}: {k}={config[k]!r} is not supported (only {block})")
    if v("out_channels", 3, POSITIVE_INT) != v("in_channels", 3, POSITIVE_INT):
        raise ConversionError(f"{where}: in_channels and out_channels must be equal")
    return dict(block_out_channels=tuple(v("block_out_channels", (64,), POSITIVE_INTS)),
                layers_per_block=v("layers_per_block", 1, POSITIVE_INT),
                latent_channels=v("latent_channels", 4, POSITIVE_INT),
                norm_groups=v("norm_num_groups", 32, POSITIVE_INT))


def autoencoder_kl_spec(config: Mapping[str, Any], where: str = "AutoencoderKL config") -> ModelSpec:
    """The ``autoencoder_kl`` spec of an ``AutoencoderKL`` config (its ``scaling_factor``:
    :func:`vae_scaling_factor`)."""
    check_fixed(config, SD_VAE_FIXED, where)
    arch = _autoencoder_arch(config, where)
    size = config_value(config, "sample_size", 512, POSITIVE_INT, where)
    return _spec(where, "autoencoder_kl", arch, size, config_value(config, "in_channels", 3, POSITIVE_INT, where),
                 None, None)


def vae_scaling_factor(config: Mapping[str, Any], where: str = "AutoencoderKL config") -> float:
    """The factor a Stable Diffusion VAE's latents are multiplied by (diffusers' default: SD 1.x's 0.18215)."""
    return float(config_value(config, "scaling_factor", 0.18215, POSITIVE_NUMBER, where))


def autoencoder_vq_spec(config: Mapping[str, Any], where: str = "VQModel config") -> ModelSpec:
    """The ``autoencoder_vq`` spec of a ``VQModel`` config."""
    check_fixed(config, _VQ_FIXED, where)
    arch = _autoencoder_arch(config, where)
    arch.update(num_embeddings=config_value(config, "num_vq_embeddings", 256, POSITIVE_INT, where),
                embedding_dim=config.get("vq_embed_dim"), beta=VQ_BETA)
    if arch["embedding_dim"] is not None:
        config_value(config, "vq_embed_dim", None, POSITIVE_INT, where)
    size = config_value(config, "sample_size", 32, POSITIVE_INT, where)
    return _spec(where, "autoencoder_vq", arch, size, config_value(config, "in_channels", 3, POSITIVE_INT, where),
                 None, None)


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def cond_unet_config(spec: ModelSpec) -> dict:
    """The ``UNet2DConditionModel`` config of a ``unet2d_condition`` spec: the inverse of :func:`cond_unet_spec`
    (``sample_size`` is the spec's latent side; ``in_channels`` counts a concat-conditioned UNet's extra
    channels)."""
    if spec.kind != "unet2d_condition":
        raise ConversionError(f"a UNet2DConditionModel config is written for kind unet2d_condition, not {spec.kind}")
    if spec.concat not in (None, "sd_inpaint"):
        raise ConversionError(f"unet2d_condition concat={spec.concat!r} has no diffusers counterpart (only "
                              "sd_inpaint, an inpainting UNet)")
    a = kinds.get("unet2d_condition").full_arch(spec.arch)
    listed = lambda v: list(v) if isinstance(v, (tuple, list)) else v  # noqa: E731
    config = {"_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
              "sample_size": spec.image_size, "in_channels": spec.input_channels, "out_channels": spec.channels,
              "block_out_channels": list(a["block_out_channels"]), "down_block_types": list(a["down_block_types"]),
              "up_block_types": list(a["up_block_types"]), "layers_per_block": a["layers_per_block"],
              "attention_head_dim": listed(a["attention_head_dim"]),
              "transformer_layers_per_block": listed(a["transformer_layers_per_block"]),
              "cross_attention_dim": a["cross_attention_dim"], "norm_num_groups": a["norm_groups"],
              "norm_eps": float(a["norm_eps"]), "use_linear_projection": bool(a["use_linear_projection"]),
              "flip_sin_to_cos": bool(a["flip_sin_to_cos"]), "freq_shift": _number(a["freq_shift"]),
              "upcast_attention": False}
    config.update(SD_UNET_FIXED)
    return config


def _autoencoder_config(spec: ModelSpec, cls: str) -> dict:
    a = kinds.get(spec.kind).full_arch(spec.arch)
    n = len(a["block_out_channels"])
    return {"_class_name": cls, "_diffusers_version": DIFFUSERS_VERSION, "in_channels": spec.channels,
            "out_channels": spec.channels, "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n, "block_out_channels": list(a["block_out_channels"]),
            "layers_per_block": a["layers_per_block"], "latent_channels": a["latent_channels"],
            "norm_num_groups": a["norm_groups"], "sample_size": spec.image_size}


def autoencoder_kl_config(spec: ModelSpec) -> dict:
    """The ``AutoencoderKL`` config of an ``autoencoder_kl`` spec, without ``scaling_factor`` (a latent model's
    ``scale_factor``, which a Stable Diffusion folder's exporter adds)."""
    if spec.kind != "autoencoder_kl":
        raise ConversionError(f"an AutoencoderKL config is written for kind autoencoder_kl, not {spec.kind}")
    config = _autoencoder_config(spec, "AutoencoderKL")
    config.update({k: v for k, v in SD_VAE_FIXED.items() if v is not None})
    return config


def autoencoder_vq_config(spec: ModelSpec) -> dict:
    """The ``VQModel`` config of an ``autoencoder_vq`` spec; a commitment weight ``beta`` other than VQModel's
    0.25 has no counterpart and is refused in one line."""
    if spec.kind != "autoencoder_vq":
        raise ConversionError(f"a VQModel config is written for kind autoencoder_vq, not {spec.kind}")
    a = kinds.get("autoencoder_vq").full_arch(spec.arch)
    if a["beta"] != VQ_BETA:
        raise ConversionError(f"autoencoder_vq beta={a['beta']!r} has no diffusers counterpart (VQModel's quantizer "
                              f"has beta {VQ_BETA})")
    config = _autoencoder_config(spec, "VQModel")
    config.update(_VQ_FIXED, num_vq_embeddings=a["num_embeddings"],
                  vq_embed_dim=a["embedding_dim"] or a["latent_channels"], force_upcast=False)
    return config
