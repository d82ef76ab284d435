"""The ``stable_diffusion`` format: a diffusers Stable Diffusion folder (``unet/``: a ``UNet2DConditionModel``,
``vae/``: an ``AutoencoderKL``, ``scheduler/``, and ``text_encoder/`` with ``tokenizer/`` when it has them) -> one
latent diffusion model;
and the diffusers ``UNet2DConditionModel`` / ``AutoencoderKL`` / ``VQModel`` state dicts of modules built here."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from ddim_jax.autoencoder import AutoencoderKL, AutoencoderVQ
from ddim_jax.cond_unet import UNet2DCondition
from ddim_jax.convert.clip_text import find_text_encoder
from ddim_jax.convert.common import find_diffusers_weights, map_params, read_json
from ddim_jax.convert.diffusers_ldm import cond_unet_key, vae_scaling_factor
from ddim_jax.convert.kinds import converter
from ddim_jax.convert.scheduler import diffusers_schedule
from ddim_jax.models import ModelSpec
from ddim_jax.state_dicts import ConversionError, read_state_dict

__all__ = ["cond_unet_key", "convert_autoencoder_kl", "convert_autoencoder_vq", "convert_stable_diffusion",
           "convert_unet2d_condition", "is_sd_folder"]


def _module_shapes(model, *inputs) -> dict:
    return jax.eval_shape(lambda k: model.init(k, *inputs)["params"], jax.random.key(0))


def _module_params(kind: str, state_dict: Mapping[str, Any], shapes) -> dict:
    return map_params(state_dict, shapes, converter(kind).key(None), f"diffusers {converter(kind).class_name}")


def convert_unet2d_condition(state_dict: Mapping[str, Any], **arch) -> dict:
    """Params of ``ddim_jax.cond_unet.UNet2DCondition(**arch)`` from a diffusers ``UNet2DConditionModel``
    state dict (e.g. Stable Diffusion's ``unet/diffusion_pytorch_model.safetensors`` with
    ``arch = cond_unet.SD15``)."""
    model = UNet2DCondition(**arch)
    n = len(model.block_out_channels)
    x = jnp.zeros((1, 2 ** (n + 1), 2 ** (n + 1), model.in_channels), jnp.float32)
    ctx = jnp.zeros((1, 1, model.cross_attention_dim), jnp.float32)
    y = None if model.num_class_embeds is None else jnp.zeros((1,), jnp.int32)
    return _module_params("unet2d_condition", state_dict, _module_shapes(model, x, jnp.zeros((1,)), ctx, y))


def convert_autoencoder_kl(state_dict: Mapping[str, Any], **arch) -> dict:
    """Params of ``ddim_jax.autoencoder.AutoencoderKL(**arch)`` from a diffusers ``AutoencoderKL`` state dict
    (torch tensors or arrays; e.g. Stable Diffusion's ``vae/diffusion_pytorch_model.safetensors`` with
    ``arch = autoencoder.SD_VAE``)."""
    model = AutoencoderKL(**arch)
    shapes = _module_shapes(model, jnp.zeros((1, 8, 8, model.in_channels), jnp.float32))
    return _module_params("autoencoder_kl", state_dict, shapes)


def convert_autoencoder_vq(state_dict: Mapping[str, Any], **arch) -> dict:
    """Params of ``ddim_jax.autoencoder.AutoencoderVQ(**arch)`` from a diffusers ``VQModel`` state dict."""
    model = AutoencoderVQ(**arch)
    shapes = _module_shapes(model, jnp.zeros((1, 8, 8, model.in_channels), jnp.float32))
    return _module_params("autoencoder_vq", state_dict, shapes)


# ----------------------------------------------------------------------------------------------
# Stable Diffusion folders (diffusers' pipeline layout: unet/, vae/, scheduler/)


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
    missing = [n + "/config.json" for n in ("unet", "vae")
               if not os.path.isfile(os.path.join(folder, n, "config.json"))]
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
    unet_kind, vae_kind = converter("unet2d_condition"), converter("autoencoder_kl")
    ae = vae_kind.read_config(vc, vae_where)
    scale = vae_scaling_factor(vc, vae_where)
    try:
        size, latent_ch = ae.latent_shape
    except ValueError as e:
        raise ConversionError(f"{vae_where}: {e}") from None
    for key, allowed in (("out_channels", (latent_ch,)), ("in_channels", (latent_ch, 2 * latent_ch + 1))):
        value = uc.get(key, 4)  # an inpainting UNet also takes the mask and the masked image's latents
        if isinstance(value, int) and not isinstance(value, bool) and value not in allowed:
            raise ConversionError(f"{unet_where}: {key}={value} but the VAE's latents have {latent_ch} channels"
                                  + ("" if len(allowed) == 1 else
                                     f" (allowed: {latent_ch}, or {2 * latent_ch + 1} for an inpainting UNet)"))
    unet = unet_kind.read_config(uc, unet_where)
    sched_path = os.path.join(folder, "scheduler", "scheduler_config.json")
    sched = read_json(sched_path) if os.path.isfile(sched_path) else None
    schedule, prediction_type = diffusers_schedule(sched, sched_path)
    try:
        spec = dataclasses.replace(unet, image_size=size, schedule=schedule, prediction_type=prediction_type,
                                   autoencoder=ae, scale_factor=scale, text_encoder=text and text[0])
    except ValueError as e:
        raise ConversionError(f"{unet_where}: {e}") from None
    params = {"denoiser": unet_kind.to_params(read_state_dict(unet_weights)[0], spec),
              "autoencoder": vae_kind.to_params(read_state_dict(vae_weights)[0], ae)}
    if text is not None:
        params["text_encoder"] = converter(text[0].kind).to_params(read_state_dict(text[1])[0], spec.text_encoder)
    return spec, params


def is_sd_folder(src: str) -> bool:
    """A folder in diffusers' pipeline layout holding a VAE or a UNet2DConditionModel."""
    unet = os.path.join(src, "unet", "config.json")
    if os.path.isdir(os.path.join(src, "vae")):
        return True
    try:
        return os.path.isfile(unet) and read_json(unet).get("_class_name") == "UNet2DConditionModel"
    except ConversionError:
        return False
