"""transformers' ``CLIPTextModel`` -> :class:`ddim_jax.clip_text.CLIPTextModel`: the key map, the spec from a
``config.json``, and a Stable Diffusion folder's ``text_encoder/`` and ``tokenizer/``.

A Stable Diffusion folder converts with its text encoder when it has both ``text_encoder/`` (``config.json``
and ``model.safetensors`` or ``pytorch_model.bin``) and ``tokenizer/`` (CLIP's ``vocab.json``, ``merges.txt``,
``tokenizer_config.json``, ``special_tokens_map.json``, or transformers 5's ``tokenizer.json`` and
``tokenizer_config.json``); with neither, as a model without one; with one of
the two, not at all."""

from __future__ import annotations

import os
from typing import Any, Mapping

from ddim_jax import kinds
from ddim_jax.clip_text import ACTIVATIONS
from ddim_jax.convert.common import POSITIVE_INT, POSITIVE_NUMBER, config_value, diffusers_key, map_params, read_json
from ddim_jax.models import TOKENIZER_DIR, ModelSpec
from ddim_jax.state_dicts import ConversionError, read_state_dict
from ddim_jax.tokenizer import CLIPTokenizer

TEXT_ENCODER_DIR = "text_encoder"
TEXT_ENCODER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# transformers 4 saved CLIPTextModel's weights under "text_model." (the layout of every Stable Diffusion folder
# on the Hub) with its position_ids buffer (not a parameter); transformers 5 saves them without either.
PREFIX = "text_model."
IGNORED_KEYS = ("embeddings.position_ids",)
WHAT = "transformers CLIPTextModel"

_ACT = (f"one of {', '.join(ACTIVATIONS)}", lambda v: v in ACTIVATIONS)
_TOKEN_ID = ("a token id (an integer >= 0)", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0)
_CLASSES = ("absent or [\"CLIPTextModel\"]", lambda v: v is None or v == ["CLIPTextModel"])
_MODEL_TYPE = ("'clip_text_model'", lambda v: v == "clip_text_model")


def clip_text_key(path: tuple[str, ...], prefix: str = PREFIX) -> str:
    """The transformers ``CLIPTextModel`` key of our param ``path``: ``("encoder", "layers_3", "self_attn",
    "q_proj", "kernel")`` -> ``text_model.encoder.layers.3.self_attn.q_proj.weight`` (``prefix=""``: the
    layout transformers 5 saves, ``encoder.layers.3...``)."""
    return prefix + diffusers_key(path)


def clip_text_spec(config: Mapping[str, Any], where: str) -> ModelSpec:
    """The ``clip_text`` spec of a transformers ``CLIPTextConfig`` (``config.json``; absent fields take
    transformers' defaults); each value read is checked, a bad one named in one line with ``where``."""

    def c(key, default, allowed):
        return config_value(config, key, default, allowed, where)

    c("architectures", None, _CLASSES)
    c("model_type", "clip_text_model", _MODEL_TYPE)
    arch = dict(vocab_size=c("vocab_size", 49408, POSITIVE_INT), hidden_size=c("hidden_size", 512, POSITIVE_INT),
                intermediate_size=c("intermediate_size", 2048, POSITIVE_INT),
                num_hidden_layers=c("num_hidden_layers", 12, POSITIVE_INT),
                num_attention_heads=c("num_attention_heads", 8, POSITIVE_INT),
                max_position_embeddings=c("max_position_embeddings", 77, POSITIVE_INT),
                hidden_act=c("hidden_act", "quick_gelu", _ACT),
                layer_norm_eps=float(c("layer_norm_eps", 1e-5, POSITIVE_NUMBER)),
                eos_token_id=c("eos_token_id", 49407, _TOKEN_ID))
    try:
        return ModelSpec("clip_text", arch, None, None, None, None)
    except ValueError as e:
        raise ConversionError(f"{where}: {e}") from None


def clip_text_config(spec: ModelSpec) -> dict:
    """The transformers ``CLIPTextConfig`` (``config.json``) of a ``clip_text`` spec: the inverse of
    :func:`clip_text_spec`. The tokenizer's ``bos_token_id`` and ``pad_token_id`` are not the encoder's (a
    Stable Diffusion folder's exporter adds its tokenizer's)."""
    if spec.kind != "clip_text":
        raise ConversionError(f"a CLIPTextConfig is written for kind clip_text, not {spec.kind}")
    a = kinds.get("clip_text").full_arch(spec.arch)
    config = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "torch_dtype": "float32",
              "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
              "projection_dim": a["hidden_size"]}
    config.update({k: a[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                     "num_attention_heads", "max_position_embeddings", "hidden_act", "eos_token_id")})
    config["layer_norm_eps"] = float(a["layer_norm_eps"])
    return config


def convert_clip_text(state_dict: Mapping[str, Any], spec: ModelSpec) -> dict:
    """Params of the ``clip_text`` model ``spec`` from a transformers ``CLIPTextModel`` state dict (torch
    tensors or arrays; keys under ``text_model.`` as transformers 4 saved them, or without, as transformers 5
    does), key for key; a missing, unexpected, misshapen or non-finite weight is a one-line
    :class:`ConversionError` naming it."""
    prefix = PREFIX if any(k.startswith(PREFIX) for k in state_dict) else ""
    return map_params(state_dict, spec.param_shapes(), lambda path: clip_text_key(path, prefix), WHAT,
                      ignore=tuple(prefix + k for k in IGNORED_KEYS))


def sd_tokenizer(folder: str) -> CLIPTokenizer:
    """The tokenizer of a Stable Diffusion folder's ``tokenizer/``; a missing or bad file is a one-line
    :class:`ConversionError` naming it."""
    try:
        return CLIPTokenizer.from_folder(os.path.join(folder, TOKENIZER_DIR))
    except (ValueError, OSError) as e:
        raise ConversionError(" ".join(str(e).split())) from None


def find_text_encoder(folder: str) -> tuple[ModelSpec, str] | None:
    """``(spec, weights file)`` of a Stable Diffusion folder's text encoder, or None when it has neither
    ``text_encoder/`` nor ``tokenizer/``; refuses (one line naming what is missing) a folder with one of them
    only, or with a part missing a file, or a tokenizer whose rows the text encoder cannot read. Reads the
    configs and the tokenizer, not the weights."""
    te, tok = os.path.join(folder, TEXT_ENCODER_DIR), os.path.join(folder, TOKENIZER_DIR)
    has_te, has_tok = os.path.isdir(te), os.path.isdir(tok)
    if not has_te and not has_tok:
        return None
    if not has_tok:
        raise ConversionError(f"Stable Diffusion folder {folder} has {TEXT_ENCODER_DIR}/ but no {TOKENIZER_DIR}/ "
                              "(the text encoder converts with its tokenizer)")
    if not has_te:
        raise ConversionError(f"Stable Diffusion folder {folder} has {TOKENIZER_DIR}/ but no {TEXT_ENCODER_DIR}/ "
                              "(the tokenizer converts with its text encoder)")
    tokenizer = sd_tokenizer(folder)
    config_path = os.path.join(te, "config.json")
    if not os.path.isfile(config_path):
        raise ConversionError(f"{te} has no config.json (a transformers CLIPTextModel folder: config.json and "
                              f"{' or '.join(TEXT_ENCODER_WEIGHTS)})")
    weights = [os.path.join(te, n) for n in TEXT_ENCODER_WEIGHTS if os.path.isfile(os.path.join(te, n))]
    if not weights:
        raise ConversionError(f"{te} has no {' or '.join(TEXT_ENCODER_WEIGHTS)} (the text encoder's weights)")
    spec = clip_text_spec(read_json(config_path), config_path)
    length, vocab = spec.arch["max_position_embeddings"], spec.arch["vocab_size"]
    if tokenizer.max_length != length:
        raise ConversionError(f"{tok}: model_max_length={tokenizer.max_length} but the text encoder reads "
                              f"{length} tokens ({config_path}: max_position_embeddings)")
    if max(tokenizer.vocab.values()) >= vocab:
        raise ConversionError(f"{tok}: vocab.json has ids up to {max(tokenizer.vocab.values())} but the text encoder "
                              f"has {vocab} embeddings ({config_path}: vocab_size)")
    return spec, weights[0]


def text_encoder_params(weights: str, spec: ModelSpec) -> dict:
    """The text encoder's params from its weights file, mapped onto ``spec`` (:func:`convert_clip_text`)."""
    return convert_clip_text(read_state_dict(weights)[0], spec)
