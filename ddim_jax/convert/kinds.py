"""Each model kind's counterpart in the PyTorch ecosystem, in one table (:data:`CONVERTERS`).

An entry names the diffusers or transformers class of a kind (:mod:`ddim_jax.kinds`), its weights file, its
key function (our param path -> the reference's state-dict key), the state-dict importer, and the config
writer (spec -> the class's ``config.json``) and reader (``config.json`` -> spec). The converters reading
diffusers folders, the exporter (:mod:`ddim_jax.convert.export`) and LoRA files (:mod:`ddim_jax.lora`) look a
kind up here. Kinds without a counterpart are in :data:`NO_EXTERNAL_FORMAT`, with the reason.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from ddim_jax import kinds as model_kinds
from ddim_jax.convert.clip_text import clip_text_config, clip_text_key, clip_text_spec, convert_clip_text
from ddim_jax.convert.common import DIFFUSERS_WEIGHTS, diffusers_key, map_params, unmap_params
from ddim_jax.convert.diffusers_ldm import (autoencoder_kl_config, autoencoder_kl_spec, autoencoder_vq_config,
                                            autoencoder_vq_spec, cond_unet_config, cond_unet_key, cond_unet_spec)
from ddim_jax.convert.diffusers_unet import (diffusers_params, diffusers_spec, unet2d_config, unet2d_key,
                                             unet2d_pointwise)
from ddim_jax.models import ModelSpec
from ddim_jax.state_dicts import ConversionError


@dataclasses.dataclass(frozen=True)
class Converter:
    """One kind's reference class. ``library``: ``"diffusers"`` or ``"transformers"``; ``class_name``: the class
    (a config's ``_class_name`` or ``architectures``); ``weights``: the safetensors file its folder holds.
    ``key(spec)``: ``path -> key`` for that spec's params; ``pointwise(key)``: whether the reference holds a key
    as a 1x1 convolution where ours is a dense kernel. ``to_params(state_dict, spec)``: the params of the
    spec's own network (:func:`network_spec`) from a reference state dict (every key checked, legacy spellings
    read). ``write_config(spec)``: the class's ``config.json``; ``read_config(config, where)``: the spec of one
    (None where no reader exists; a UNet's has DDPM's schedule until a scheduler config sets it)."""

    library: str
    class_name: str
    weights: str
    key: Callable[[ModelSpec], Callable[[tuple], str]]
    to_params: Callable[[Mapping[str, Any], ModelSpec], dict]
    write_config: Callable[[ModelSpec], dict]
    read_config: Callable[[Mapping[str, Any], str], ModelSpec] | None
    pointwise: Callable[[str], bool] = lambda key: False

    def from_params(self, spec: ModelSpec, params) -> dict[str, np.ndarray]:
        """The reference state dict of ``params`` (torch layout, float32): the inverse of :attr:`to_params`."""
        return unmap_params(params, self.key(spec), self.pointwise, f"{self.class_name} export")


def network_spec(spec: ModelSpec) -> ModelSpec:
    """The spec of a model's own network: a latent or text-conditioned model without its autoencoder and text
    encoder (each of those is its own kind's entry)."""
    if spec.autoencoder is None and spec.text_encoder is None:
        return spec
    return dataclasses.replace(spec, autoencoder=None, scale_factor=None, text_encoder=None, clip_skip=0)


def _mapped(what: str, key: Callable[[ModelSpec], Callable[[tuple], str]]):
    return lambda state_dict, spec: map_params(state_dict, network_spec(spec).param_shapes(), key(spec), what)


def _unet2d_key(spec: ModelSpec) -> Callable[[tuple], str]:
    num_levels = len(spec.arch["ch_mult"])
    return lambda path: unet2d_key(path, num_levels)


CONVERTERS: dict[str, Converter] = {
    "unet": Converter(
        "diffusers", "UNet2DModel", DIFFUSERS_WEIGHTS[0], _unet2d_key,
        lambda sd, spec: diffusers_params(sd, network_spec(spec)),
        unet2d_config, lambda config, where: diffusers_spec(config, None, None, where), unet2d_pointwise),
    "unet2d_condition": Converter(
        "diffusers", "UNet2DConditionModel", DIFFUSERS_WEIGHTS[0], lambda spec: cond_unet_key,
        _mapped("diffusers UNet2DConditionModel", lambda spec: cond_unet_key), cond_unet_config, cond_unet_spec),
    "autoencoder_kl": Converter(
        "diffusers", "AutoencoderKL", DIFFUSERS_WEIGHTS[0], lambda spec: diffusers_key,
        _mapped("diffusers AutoencoderKL", lambda spec: diffusers_key), autoencoder_kl_config, autoencoder_kl_spec),
    "autoencoder_vq": Converter(
        "diffusers", "VQModel", DIFFUSERS_WEIGHTS[0], lambda spec: diffusers_key,
        _mapped("diffusers VQModel", lambda spec: diffusers_key), autoencoder_vq_config, autoencoder_vq_spec),
    # Keys as transformers 4 saved them (``text_model.`` first: every Stable Diffusion folder's layout, which
    # transformers 5 also loads); the importer also reads transformers 5's unprefixed layout.
    "clip_text": Converter(
        "transformers", "CLIPTextModel", "model.safetensors", lambda spec: clip_text_key,
        lambda sd, spec: convert_clip_text(sd, spec), clip_text_config, clip_text_spec),
}

# Kinds with no counterpart outside ddim_jax, and why.
NO_EXTERNAL_FORMAT: dict[str, str] = {
    "cross_attention_unet": "its class embedder (learned context tokens per class, latent diffusion's "
                            "class-conditional model) has no diffusers counterpart",
}


def converter(kind: str) -> Converter:
    """The table's entry for ``kind``; a kind without one is a one-line :class:`ConversionError` saying why."""
    if kind in CONVERTERS:
        return CONVERTERS[kind]
    if kind in NO_EXTERNAL_FORMAT:
        raise ConversionError(f"a {kind} model has no diffusers or transformers counterpart: "
                              f"{NO_EXTERNAL_FORMAT[kind]}")
    model_kinds.get(kind)  # an unknown kind: ValueError naming the registered ones
    raise ConversionError(f"model kind {kind!r} has no entry in ddim_jax.convert.kinds.CONVERTERS")
