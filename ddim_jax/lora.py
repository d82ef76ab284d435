"""LoRA weights for converted Stable Diffusion models (kind ``unet2d_condition``, with or without a text encoder).

A LoRA file adds a low-rank update to some of the network's weights: ``W' = W + scale * (alpha / r) * B @ A``
with ``A`` (``down``) ``[r, in]`` and ``B`` (``up``) ``[out, r]``; for a convolution ``A`` is ``[r, in, kh, kw]``
and ``B`` a 1x1 convolution ``[out, r, 1, 1]``. Two formats of ``.safetensors`` files are read (pickled
PyTorch files are not):

- diffusers / peft: ``unet.<module>.lora_A.weight`` and ``.lora_B.weight`` (also diffusers' older
  ``.lora.down.weight`` / ``.lora.up.weight``, ``.lora_linear_layer.down.weight`` and
  ``<attn>.processor.to_q_lora.down.weight``), ``text_encoder.<module>...`` for the text encoder; alpha from a
  ``<part>.<module>.alpha`` entry or the file's adapter metadata (``lora_alpha``, ``alpha_pattern``,
  ``use_rslora``), else ``alpha = r``. Keys without a part prefix (peft's own state dict) are the UNet's.
- kohya: ``lora_unet_<module with "_" for ".">.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, and
  ``lora_te_<module>...`` for the text encoder; alpha = r without an ``.alpha`` (or with an alpha of 0).

``<module>`` is diffusers' ``UNet2DConditionModel`` module path (``down_blocks.0.attentions.0.transformer_blocks.0
.attn1.to_q``; for a DDPM UNet, kind ``unet``, ``UNet2DModel``'s, as :mod:`ddim_jax.training.adapters` writes
them) or transformers' ``CLIPTextModel`` one (``text_model.encoder.layers.0.self_attn.q_proj``, with or
without ``text_model.``), resolved against the model's own parameters through the key functions of the
converters' table (:data:`ddim_jax.convert.kinds.CONVERTERS`, the model's kind and its text encoder's). Text-encoder
entries need a model converted with its text encoder (``params["text_encoder"]``).

:func:`apply_lora` merges a file into the params (new params; the old ones are untouched). :func:`lora_delta`
gives the per-parameter updates at scale 1, for :func:`add_delta` to add at a scale inside a jitted function.
Every problem (an unknown key, a module the model does not have, a shape that does not fit, a non-finite
value, ranks that differ between ``A`` and ``B``) is a one-line :class:`ConversionError` naming the key, and
no params are made.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ddim_jax.convert.clip_text import PREFIX as CLIP_PREFIX
from ddim_jax.convert.kinds import converter
from ddim_jax.models import ModelSpec
from ddim_jax.state_dicts import ConversionError, one_line, to_numpy

__all__ = ["Lora", "LoraModule", "add_delta", "apply_lora", "lora_delta", "parse_lora", "read_lora"]

METADATA_KEY = "lora_adapter_metadata"  # diffusers' adapter configs in a safetensors header, as JSON
LORA_KINDS = ("unet2d_condition", "unet")  # the kinds whose diffusers module paths LoRA files name

# diffusers / peft keys: <module>.<suffix> -> which matrix.
_DIFFUSERS_SUFFIXES = {"lora_A.weight": "down", "lora_B.weight": "up", "lora.down.weight": "down",
                       "lora.up.weight": "up", "lora_linear_layer.down.weight": "down",
                       "lora_linear_layer.up.weight": "up", "alpha": "alpha"}
_KOHYA_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
# diffusers' attention-processor LoRA (before peft): <attn>.processor.to_q_lora.down.weight -> <attn>.to_q.
_PROCESSOR = re.compile(r"(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
_KOHYA = re.compile(r"lora_(unet|te\d*)_")
_DIFFUSERS_PARTS = ("unet", "text_encoder", "text_encoder_2")


@dataclasses.dataclass(frozen=True)
class LoraModule:
    """One adapted module: ``key`` names it as the file does (for messages), ``part`` is ``"unet"`` or
    ``"text_encoder"``, ``module`` its diffusers module path (kohya: the name with ``_`` for ``.``, resolved
    against a model later), ``down`` (A) ``[r, in(, kh, kw)]``, ``up`` (B) ``[out, r(, 1, 1)]``, and
    ``scaling`` = alpha / r (alpha / sqrt(r) for rank-stabilised LoRA)."""

    key: str
    part: str
    module: str
    down: np.ndarray
    up: np.ndarray
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclasses.dataclass(frozen=True)
class Lora:
    """A LoRA file's modules; ``format`` is ``"diffusers"`` or ``"kohya"``; ``source`` names it in messages."""

    format: str
    modules: tuple[LoraModule, ...]
    source: str = "LoRA"


# ----------------------------------------------------------------------------------------------
# Reading


def read_lora(path: str | os.PathLike) -> Lora:
    """The LoRA in a ``.safetensors`` file (diffusers/peft or kohya keys; see the module's doc)."""
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ConversionError(f"{path}: LoRA weights are read from .safetensors files only (a pickled PyTorch "
                              "file can run code when loaded; save it with safetensors)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file not found: {path}")
    from safetensors import SafetensorError, safe_open

    try:  # the flax framework reads bfloat16, which numpy cannot
        with safe_open(path, framework="flax") as f:
            metadata = f.metadata() or {}
            names = f.keys()
            state_dict = {k: np.asarray(f.get_tensor(k), np.float32) for k in names}
    except (SafetensorError, ValueError, TypeError, OSError) as e:
        raise ConversionError(f"cannot read {path} as a safetensors file ({one_line(e)})") from None
    adapters = None
    if metadata.get(METADATA_KEY):
        try:
            adapters = json.loads(metadata[METADATA_KEY])
        except ValueError as e:
            raise ConversionError(f"{path}: its {METADATA_KEY} metadata is not valid JSON ({one_line(e)})") from None
    return parse_lora(state_dict, adapters, source=path)


def parse_lora(state_dict: Mapping[str, Any], adapters: Mapping[str, Any] | None = None,
               source: str = "LoRA") -> Lora:
    """A :class:`Lora` from a state dict (arrays or torch tensors) in diffusers/peft or kohya keys.
    ``adapters``: diffusers' adapter metadata (``{"unet.lora_alpha": 8, "unet.alpha_pattern": {...}, ...}``)."""
    state_dict = {k: np.asarray(to_numpy(k, np.asarray(v) if isinstance(v, (np.generic, float, int)) else v), np.float32)
                  for k, v in state_dict.items()}
    if not state_dict:
        raise ConversionError(f"{source}: the file holds no tensors")
    kohya = [k for k in state_dict if _KOHYA.match(k)]
    diffusers = [k for k in state_dict if not _KOHYA.match(k) and _diffusers_entry(k) is not None]
    if kohya and diffusers:
        raise ConversionError(f"{source}: mixes kohya keys (e.g. '{kohya[0]}') and diffusers keys (e.g. "
                              f"'{diffusers[0]}'); a LoRA file is in one format")
    if not kohya and not diffusers:
        raise ConversionError(f"{source}: matches neither LoRA format (diffusers '<module>.lora_A.weight' or kohya "
                              f"'lora_unet_<module>.lora_down.weight'); first key '{next(iter(state_dict))}'")
    fmt = "kohya" if kohya else "diffusers"
    entries: dict[tuple[str, str], dict[str, tuple[str, np.ndarray]]] = {}  # (part, module) -> kind -> (key, value)
    for key, value in state_dict.items():
        entry = _kohya_entry(key) if fmt == "kohya" else _diffusers_entry(key)
        if entry is None:
            raise ConversionError(f"{source}: unknown key '{key}' in a {fmt} LoRA file (expected "
                                  + ("lora_unet_<module>.lora_down.weight, .lora_up.weight or .alpha)" if fmt == "kohya"
                                     else "<module>.lora_A.weight, .lora_B.weight or .alpha)"))
        part, module, kind = entry
        if not np.all(np.isfinite(value)):
            raise ConversionError(f"{source}: key '{key}' has non-finite values (NaN or inf)")
        slot = entries.setdefault((part, module), {})
        if kind in slot:
            raise ConversionError(f"{source}: keys '{slot[kind][0]}' and '{key}' are both the {kind} weight of "
                                  f"module '{module}'")
        slot[kind] = (key, value)
    config = _adapter_config(adapters, source) if fmt == "diffusers" else {}
    modules = []
    for (part, module), slot in entries.items():
        name = (slot.get("down") or slot.get("up") or slot["alpha"])[0]
        for kind in ("down", "up"):
            if kind not in slot:
                other = "up" if kind == "down" else "down"
                raise ConversionError(f"{source}: module of key '{name}' has no {kind} weight"
                                      + (f" beside its {other} weight" if other in slot else " (only an alpha)"))
        (down_key, down), (up_key, up) = slot["down"], slot["up"]
        if down.ndim not in (2, 4) or up.ndim not in (2, 4) or (up.ndim == 4 and up.shape[2:] != (1, 1)):
            raise ConversionError(f"{source}: keys '{down_key}' {down.shape} and '{up_key}' {up.shape} are not a "
                                  "LoRA pair (down [r, in] or [r, in, kh, kw]; up [out, r] or [out, r, 1, 1])")
        if down.shape[0] != up.shape[1]:
            raise ConversionError(f"{source}: rank mismatch: '{down_key}' has rank {down.shape[0]} "
                                  f"{tuple(down.shape)} but '{up_key}' has rank {up.shape[1]} {tuple(up.shape)}")
        rank = int(down.shape[0])
        if "alpha" in slot:
            alpha_key, alpha = slot["alpha"]
            if alpha.size != 1:
                raise ConversionError(f"{source}: key '{alpha_key}' must be one number; it has shape {alpha.shape}")
            alpha, rslora = float(alpha.reshape(())), False
            if fmt == "kohya" and alpha == 0:  # sd-scripts reads an alpha of 0 as none: alpha = r
                alpha = float(rank)
        else:
            alpha, rslora = _config_alpha(config.get(part), module, rank)
        scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        modules.append(LoraModule(down_key, part, module, down, up.reshape(up.shape[:2]), scaling))
    return Lora(fmt, tuple(modules), source)


def _diffusers_entry(key: str) -> tuple[str, str, str] | None:
    """``(part, module, kind)`` of a diffusers/peft key, or None. Keys without a part prefix are the UNet's."""
    part, rest = key.split(".", 1) if "." in key else ("", key)
    if part not in _DIFFUSERS_PARTS:
        part, rest = "unet", key
    m = _PROCESSOR.fullmatch(rest)
    if m:
        attn, name, kind = m.groups()
        return part, f"{attn}.{'to_out.0' if name == 'to_out' else name}", kind
    for suffix, kind in _DIFFUSERS_SUFFIXES.items():
        if rest.endswith("." + suffix) and len(rest) > len(suffix) + 1:
            return part, rest[: -len(suffix) - 1], kind
    return None


def _kohya_entry(key: str) -> tuple[str, str, str] | None:
    m = _KOHYA.match(key)
    name, _, suffix = key[m.end():].partition(".")
    kind = _KOHYA_SUFFIXES.get(suffix)
    if kind is None or not name:
        return None
    part = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}.get(m.group(1))
    return (part or m.group(1)), name, kind


def _adapter_config(adapters: Mapping[str, Any] | None, source: str) -> dict[str, dict]:
    """diffusers' adapter metadata (``"unet.lora_alpha"`` ...) by part, with the settings that change the math
    checked."""
    out: dict[str, dict] = {}
    if adapters is None:
        return out
    if not isinstance(adapters, Mapping):
        raise ConversionError(f"{source}: its {METADATA_KEY} metadata must be a JSON object")
    for key, value in adapters.items():
        part, _, field = str(key).partition(".")
        if not field:
            part, field = "unet", part
        out.setdefault(part, {})[field] = value
    for part, config in out.items():
        for field in ("use_dora", "lora_bias"):
            if config.get(field):
                raise ConversionError(f"{source}: its {part} adapter sets {field}=true, which ddim_jax does not "
                                      "implement (plain LoRA only)")
        alphas = [config.get("lora_alpha")] + list((config.get("alpha_pattern") or {}).values())
        if not all(a is None or (isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a))
                   for a in alphas) or not isinstance(config.get("alpha_pattern") or {}, Mapping):
            raise ConversionError(f"{source}: its {part} adapter's lora_alpha / alpha_pattern must be finite numbers")
    return out


def _config_alpha(config: Mapping[str, Any] | None, module: str, rank: int) -> tuple[float, bool]:
    """(alpha, rank-stabilised?) of ``module`` from peft's adapter config: its ``alpha_pattern`` entry (peft's
    rule: the pattern matches the end of the module path at a ``.``), else ``lora_alpha``, else the rank."""
    if not config:
        return float(rank), False
    alpha = config.get("lora_alpha")
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return float(rank if alpha is None else alpha), bool(config.get("use_rslora"))


# ----------------------------------------------------------------------------------------------
# Resolving modules against a model


_TARGETS: dict = {}  # by architecture: see _targets


def _targets(spec: ModelSpec) -> dict[str, dict]:
    """The model's adaptable modules (those with a ``kernel``), from its own param shapes and the converters'
    key maps: ``{part: {module path: (our param path, kernel shape)}}`` for the parts ``"unet"`` (diffusers'
    ``UNet2DConditionModel`` paths) and, with a text encoder, ``"text_encoder"`` (transformers' ``CLIPTextModel``
    paths, with and without its ``text_model.`` level), and ``{"kohya:" + part: {kohya name: module path}}``."""
    if spec.kind not in LORA_KINDS:
        raise ConversionError(f"LoRA files apply to Stable Diffusion UNets (kind unet2d_condition) and DDPM UNets "
                              f"(kind unet, diffusers' UNet2DModel); this model is a {spec.kind}")
    key = json.dumps(spec.architecture(), sort_keys=True)
    if key not in _TARGETS:
        shapes = spec.param_shapes()
        components = "denoiser" in shapes  # {"denoiser", "autoencoder", "text_encoder"}, else the UNet's own
        parts = {"unet": {}}
        unet_key = converter(spec.kind).key(spec)
        for path, s in traverse_util.flatten_dict(shapes["denoiser"] if components else shapes).items():
            if path[-1] == "kernel":
                parts["unet"][unet_key(path)[: -len(".weight")]] = (
                    ("denoiser", *path) if components else path, tuple(s.shape))
        if spec.text_encoder is not None:
            parts["text_encoder"] = {}
            text_key = converter(spec.text_encoder.kind).key(spec.text_encoder)  # transformers 4's keys
            for path, s in traverse_util.flatten_dict(shapes["text_encoder"]).items():
                if path[-1] == "kernel":
                    module = text_key(path)[: -len(".weight")]
                    for name in (module, module.removeprefix(CLIP_PREFIX)):  # transformers 4's layout, and 5's
                        parts["text_encoder"][name] = (("text_encoder", *path), tuple(s.shape))
        for part, modules in list(parts.items()):
            kohya = {m.replace(".", "_"): m for m in modules if part == "unet" or m.startswith(CLIP_PREFIX)}
            assert len(kohya) == len(modules) // (1 if part == "unet" else 2), "two module paths share a kohya name"
            parts["kohya:" + part] = kohya
        _TARGETS[key] = parts
    return _TARGETS[key]


def _resolve(spec: ModelSpec, lora: Lora) -> dict[tuple[str, ...], tuple[LoraModule, tuple[int, ...]]]:
    """Each LoRA module's param path and kernel shape, or a one-line error naming the first that has none."""
    targets = _targets(spec)
    out: dict[tuple, tuple] = {}
    for m in lora.modules:
        if m.part not in targets:
            what = "the text encoder" if m.part == "text_encoder" else f"a second text encoder ({m.part}, SDXL's)"
            raise ConversionError(f"{lora.source}: key '{m.key}' adapts {what}; this model has no "
                                  + ("text encoder (convert the Stable Diffusion folder with its text_encoder/ and "
                                     "tokenizer/)" if m.part == "text_encoder" else "second text encoder"))
        module = targets["kohya:" + m.part].get(m.module) if lora.format == "kohya" else m.module
        if module not in targets[m.part]:
            raise ConversionError(f"{lora.source}: key '{m.key}' adapts module '{m.module}', which this model's "
                                  f"{m.part} does not have (a LoRA for another architecture?)")
        path, shape = targets[m.part][module]
        if path in out:
            raise ConversionError(f"{lora.source}: keys '{out[path][0].key}' and '{m.key}' adapt the same weight "
                                  f"({'/'.join(path)})")
        out[path] = (m, shape)
    return out


def _update(m: LoraModule, shape: tuple[int, ...], source: str) -> np.ndarray:
    """``(alpha / r) B @ A`` in our layout (``[in, out]`` or ``[kh, kw, in, out]``), or the mismatch by name."""
    kh, kw, cin, cout = shape if len(shape) == 4 else (1, 1, *shape)
    down = m.down if m.down.ndim == 4 else m.down[:, :, None, None]
    got, want = (m.up.shape[0], *down.shape[1:]), (cout, cin, kh, kw)  # torch's layout
    if got != want:
        if len(shape) == 2 and m.down.ndim == 2:
            got, want = got[:2], want[:2]
        raise ConversionError(f"{source}: key '{m.key}' gives module '{m.module}' an update of shape {got} "
                              f"(B {tuple(m.up.shape)} @ A {tuple(m.down.shape)}); the model's weight is {want} "
                              "(a LoRA for another architecture?)")
    delta = np.einsum("or,rihw->hwio", m.up, down) * np.float32(m.scaling)
    return delta if len(shape) == 4 else delta.reshape(cin, cout)


# ----------------------------------------------------------------------------------------------
# Applying


def lora_delta(spec: ModelSpec, lora: Lora | str | os.PathLike) -> dict:
    """The LoRA's updates at scale 1, ``(alpha / r) B @ A`` in our layout, as a params-like tree holding only
    the adapted kernels (float32). ``add_delta(params, delta, scale)`` adds them (jit-able, ``scale`` may be
    traced); :func:`apply_lora` is the one-call form."""
    if not isinstance(lora, Lora):
        lora = read_lora(lora)
    flat = {path: jnp.asarray(_update(m, shape, lora.source), jnp.float32)
            for path, (m, shape) in _resolve(spec, lora).items()}
    return traverse_util.unflatten_dict(flat)


def add_delta(params, delta, scale=1.0):
    """``params`` with ``scale * delta`` added to the leaves ``delta`` holds (a new tree; traceable)."""
    flat = traverse_util.flatten_dict(params)
    for path, d in traverse_util.flatten_dict(delta).items():
        flat[path] = (flat[path] + scale * d).astype(flat[path].dtype)
    return traverse_util.unflatten_dict(flat)


def apply_lora(spec: ModelSpec, params, lora: Lora | str | os.PathLike, scale: float = 1.0) -> dict:
    """New params with the LoRA merged: ``W + scale * (alpha / r) * B @ A`` for each adapted weight. ``lora``
    is a :class:`Lora` or a ``.safetensors`` file; ``params`` the spec's (a latent model's ``{"denoiser",
    "autoencoder"}``). Any problem raises a one-line :class:`ConversionError` and changes nothing."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)) \
            or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number; got {scale!r}")
    delta = lora_delta(spec, lora)
    flat = traverse_util.flatten_dict(params)
    for path, d in traverse_util.flatten_dict(delta).items():
        if path not in flat or tuple(np.shape(flat[path])) != tuple(d.shape):
            have = "missing" if path not in flat else f"of shape {tuple(np.shape(flat[path]))}"
            raise ConversionError(f"params do not match the spec: '{'/'.join(path)}' is {have}, the spec's is "
                                  f"{tuple(d.shape)}")
    return add_delta(params, delta, float(scale))
