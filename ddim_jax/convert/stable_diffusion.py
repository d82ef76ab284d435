"""The ``stable_diffusion`` format: a diffusers Stable Diffusion folder (``unet/``: a ``UNet2DConditionModel``,
``vae/``: an ``AutoencoderKL``, ``scheduler/``, and ``text_encoder/`` with ``tokenizer/`` when it has them) -> one
latent diffusion model;
and the diffusers ``UNet2DConditionModel`` / ``AutoencoderKL`` / ``VQModel`` state dicts of modules built here."""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from ddim_jax.autoencoder import AutoencoderKL, AutoencoderVQ
from ddim_jax.cond_unet import UNet2DCondition
from ddim_jax.convert.clip_text import find_text_encoder, text_encoder_params
from ddim_jax.convert.common import (BOOL, NAMES, NUMBER, POSITIVE_INT, POSITIVE_INT_OR_LIST, POSITIVE_INTS,
                                     POSITIVE_NUMBER, config_value, diffusers_key, find_diffusers_weights,
                                     map_params, read_json)
from ddim_jax.convert.scheduler import diffusers_schedule
from ddim_jax.models import ModelSpec
from ddim_jax.state_dicts import ConversionError, read_state_dict


def cond_unet_key(path: tuple[str, ...]) -> str:
    """The diffusers ``UNet2DConditionModel`` key of our ``UNet2DCondition`` param ``path``."""
    # ``time_embedding.linear_1`` is a name, not a list index.
    return re.sub(r"^time_embedding\.linear\.(\d)\.", r"time_embedding.linear_\1.", diffusers_key(path))


def _module_shapes(model, *inputs) -> dict:
    return jax.eval_shape(lambda k: model.init(k, *inputs)["params"], jax.random.key(0))


def convert_unet2d_condition(state_dict: Mapping[str, Any], **arch) -> dict:
    """Params of ``ddim_jax.cond_unet.UNet2DCondition(**arch)`` from a diffusers ``UNet2DConditionModel``
    state dict (e.g. Stable Diffusion's ``unet/diffusion_pytorch_model.safetensors`` with
    ``arch = cond_unet.SD15``)."""
    model = UNet2DCondition(**arch)
    n = len(model.block_out_channels)
    x = jnp.zeros((1, 2 ** (n + 1), 2 ** (n + 1), model.in_channels), jnp.float32)
    ctx = jnp.zeros((1, 1, model.cross_attention_dim), jnp.float32)
    y = None if model.num_class_embeds is None else jnp.zeros((1,), jnp.int32)
    shapes = _module_shapes(model, x, jnp.zeros((1,)), ctx, y)
    return map_params(state_dict, shapes, cond_unet_key, "diffusers UNet2DConditionModel")


def convert_autoencoder_kl(state_dict: Mapping[str, Any], **arch) -> dict:
    """Params of ``ddim_jax.autoencoder.AutoencoderKL(**arch)`` from a diffusers ``AutoencoderKL`` state dict
    (torch tensors or arrays; e.g. Stable Diffusion's ``vae/diffusion_pytorch_model.safetensors`` with
    ``arch = autoencoder.SD_VAE``)."""
    model = AutoencoderKL(**arch)
    shapes = _module_shapes(model, jnp.zeros((1, 8, 8, model.in_channels), jnp.float32))
    return map_params(state_dict, shapes, diffusers_key, "diffusers AutoencoderKL")


def convert_autoencoder_vq(state_dict: Mapping[str, Any], **arch) -> dict:
    """Params of ``ddim_jax.autoencoder.AutoencoderVQ(**arch)`` from a diffusers ``VQModel`` state dict."""
    model = AutoencoderVQ(**arch)
    shapes = _module_shapes(model, jnp.zeros((1, 8, 8, model.in_channels), jnp.float32))
    return map_params(state_dict, shapes, diffusers_key, "diffusers VQModel")


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
    scaled by the VAE's ``scaling_factor`` (0.18215 for SD 1.x). A folder with ``text_encoder/`` (a transformers
    ``CLIPTextModel``) and ``tokenizer/`` gives the spec its ``text_encoder`` (:mod:`ddim_jax.convert.clip_text`;
    ``spec.encode_text(params, ids)`` is the context); without them, sample with text-encoder outputs computed
    elsewhere (``spec.eps_fn(params, context, guidance, null_context=...)``)."""
    folder = os.fspath(folder)
    missing = [n + "/config.json" for n in ("unet", "vae") if not os.path.isfile(os.path.join(folder, n, "config.json"))]
    if missing:
        has = [n + "/" for n in ("unet", "vae", "scheduler") if os.path.isdir(os.path.join(folder, n))]
        raise ConversionError(f"Stable Diffusion folder {folder} has {', '.join(has) or 'no unet/ or vae/'} but no "
                              f"{' or '.join(missing)} (it needs unet/ and vae/, each a config.json and its weights)")
    text = find_text_encoder(folder)  # (spec, weights) or None; checked, with tokenizer/, before any weights are read
    parts = {}
    for name in ("unet", "vae"):
        weights, config_dir = find_diffusers_weights(os.path.join(folder, name))
        config_path = os.path.join(config_dir, "config.json")
        parts[name] = (read_json(config_path), weights, config_path)
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
    if u("out_channels", 4, POSITIVE_INT) != latent_ch:
        raise ConversionError(f"{unet_where}: out_channels={uc.get('out_channels', 4)} but the VAE's latents have "
                              f"{latent_ch} channels")
    in_ch = u("in_channels", 4, POSITIVE_INT)  # an inpainting UNet also takes the mask and the masked image's latents
    if in_ch not in (latent_ch, 2 * latent_ch + 1):
        raise ConversionError(f"{unet_where}: in_channels={in_ch} but the VAE's latents have {latent_ch} channels "
                              f"(allowed: {latent_ch}, or {2 * latent_ch + 1} for an inpainting UNet)")
    sched_path = os.path.join(folder, "scheduler", "scheduler_config.json")
    sched = read_json(sched_path) if os.path.isfile(sched_path) else None
    schedule, prediction_type = diffusers_schedule(sched, sched_path)
    try:
        spec = ModelSpec("unet2d_condition", arch, size, latent_ch, schedule, prediction_type, autoencoder=ae,
                         scale_factor=scale, concat=None if in_ch == latent_ch else "sd_inpaint",
                         text_encoder=text and text[0])
    except ValueError as e:
        raise ConversionError(f"{unet_where}: {e}") from None
    shapes = spec.param_shapes()
    params = {"denoiser": map_params(read_state_dict(unet_weights)[0], shapes["denoiser"], cond_unet_key,
                                     "diffusers UNet2DConditionModel"),
              "autoencoder": map_params(read_state_dict(vae_weights)[0], shapes["autoencoder"], diffusers_key,
                                        "diffusers AutoencoderKL")}
    if text is not None:
        params["text_encoder"] = text_encoder_params(text[1], spec.text_encoder)
    return spec, params


def _tuple_or_int(value: int | list) -> int | tuple:
    return tuple(value) if isinstance(value, list) else value


def is_sd_folder(src: str) -> bool:
    """A folder in diffusers' pipeline layout holding a VAE or a UNet2DConditionModel."""
    unet = os.path.join(src, "unet", "config.json")
    if os.path.isdir(os.path.join(src, "vae")):
        return True
    try:
        return os.path.isfile(unet) and read_json(unet).get("_class_name") == "UNet2DConditionModel"
    except ConversionError:
        return False
