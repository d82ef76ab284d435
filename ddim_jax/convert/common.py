"""What the formats share: checked config values, config files, and state dicts mapped onto a spec's params."""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ddim_jax.models import ModelSpec
from ddim_jax.state_dicts import ConversionError, one_line, to_numpy

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# The diffusers release whose folder layout the exporter writes (``_diffusers_version`` in its config files).
DIFFUSERS_VERSION = "0.30.0"


# ----------------------------------------------------------------------------------------------
# Config values: each one a converter reads is checked where it is read, by config_value.


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_positive_int(v: Any) -> bool:
    return _is_int(v) and v > 0


def _is_list(v: Any, item: Callable[[Any], bool]) -> bool:
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


def check_image_size(image_size: int | None) -> None:
    if image_size is not None and not _is_positive_int(image_size):
        raise ConversionError(f"--image-size={image_size} is not allowed (image_size must be a positive integer)")


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            obj = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON ({one_line(e)})") from None
    if not isinstance(obj, dict):
        raise ConversionError(f"{path} must hold a JSON object, not {type(obj).__name__}")
    return obj


def find_diffusers_weights(src: str) -> tuple[str, str]:
    """(weights file, directory holding config.json) for a diffusers directory or weights file."""
    if os.path.isdir(src):
        if not os.path.isfile(os.path.join(src, "config.json")) and os.path.isfile(
                os.path.join(src, "unet", "config.json")):
            src = os.path.join(src, "unet")
        for name in DIFFUSERS_WEIGHTS:
            if os.path.isfile(os.path.join(src, name)):
                return os.path.join(src, name), src
        raise ConversionError(f"no {' or '.join(DIFFUSERS_WEIGHTS)} in {src}")
    return src, os.path.dirname(os.path.abspath(src))


def unet_spec(kwargs: Mapping[str, Any], image_size: int, channels: int, schedule: Mapping[str, Any],
              prediction_type: str, where: str) -> ModelSpec:
    """The spec of a converted UNet (``kwargs`` are UNet arguments; out_ch and num_classes are the spec's)."""
    arch = {k: v for k, v in kwargs.items() if k not in ("out_ch", "num_classes")}
    try:
        return ModelSpec("unet", arch, int(image_size), int(channels), schedule, prediction_type,
                         kwargs["num_classes"])
    except ValueError as e:
        raise ConversionError(f"{where}: {e}") from None


# ----------------------------------------------------------------------------------------------
# Key mapping: our param paths -> the checkpoint's keys; every value checked against the expected shape.

LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}


def unet_key(path: tuple[str, ...], top_rules, sub_map: Mapping[str, str], num_levels: int, fmt: str) -> str:
    """The checkpoint key of a DDPM UNet param: the first of ``top_rules`` (``(pattern, fn(match, num_levels))``)
    matching its top module, then ``sub_map``'s names for the submodules."""
    top, *subs, leaf = path
    for pattern, fn in top_rules:
        m = re.fullmatch(pattern, top)
        if m:
            return ".".join([fn(m, num_levels)] + [sub_map.get(s, s) for s in subs] + [LEAF[leaf]])
    raise ConversionError(f"the {fmt} format has no counterpart of params '{'/'.join(path)}'")


def diffusers_key(path: tuple[str, ...]) -> str:
    """A diffusers state-dict key for our path in a module named after diffusers' (list indices joined
    with ``_``): ``("encoder", "down_blocks_0", "resnets_1", "conv1", "kernel")`` ->
    ``encoder.down_blocks.0.resnets.1.conv1.weight``."""
    *mods, leaf = path
    parts = [re.sub(r"_(\d+)$", r".\1", m) for m in mods]
    return ".".join(parts + [LEAF[leaf]])


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


def map_params(state_dict: Mapping[str, Any], shapes, ref_key: Callable[[tuple], str], what: str,
               ignore: tuple[str, ...] = ()) -> dict:
    """Params of the shapes ``shapes`` (e.g. ``spec.param_shapes()``) from ``state_dict`` (torch tensors or
    arrays), our path -> ``ref_key(path)``; raises ConversionError naming the first missing/unexpected key,
    bad shape or non-finite value, with a count of the others."""
    state_dict = {k: to_numpy(k, v) for k, v in state_dict.items()}
    flat, used, missing, mismatched, nonfinite = {}, set(), [], [], []
    for path, spec in traverse_util.flatten_dict(shapes).items():
        key, leaf, expected = ref_key(path), path[-1], tuple(spec.shape)
        if key not in state_dict:
            missing.append(f"missing key '{key}' (model expects shape {_torch_layout(expected, leaf, 2)})")
            continue
        used.add(key)
        value = state_dict[key]
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
        raise ConversionError(f"{what} checkpoint: {problems[0]}{more}")
    return traverse_util.unflatten_dict(flat)


def _to_torch(value: np.ndarray, leaf: str, pointwise: bool) -> np.ndarray:
    """The inverse of :func:`_to_flax`: our param in the reference's layout (``pointwise``: a dense kernel the
    reference holds as a 1x1 convolution)."""
    if leaf == "kernel" and value.ndim == 4:  # conv: HWIO -> OIHW
        return np.transpose(value, (3, 2, 0, 1))
    if leaf == "kernel" and value.ndim == 2:  # dense: IO -> OI (or OI11)
        return value.T.reshape(value.shape[1], value.shape[0], *((1, 1) if pointwise else ()))
    return value


def unmap_params(params, ref_key: Callable[[tuple], str], pointwise: Callable[[str], bool] = lambda key: False,
                 what: str = "model") -> dict[str, np.ndarray]:
    """The reference state dict of ``params`` (float32, C-contiguous numpy arrays): the inverse of
    :func:`map_params`, our path -> ``ref_key(path)``, kernels transposed back to torch's layout
    (``pointwise(key)``: a dense kernel the reference stores as a 1x1 convolution). Refuses, in one line, a
    non-finite value or two params mapped onto one key."""
    out: dict[str, np.ndarray] = {}
    for path, value in traverse_util.flatten_dict(params).items():
        value = np.asarray(value, np.float32)
        key = ref_key(path)
        if not np.all(np.isfinite(value)):
            raise ConversionError(f"{what}: param '{'/'.join(path)}' has non-finite values (NaN or inf)")
        if key in out:
            raise ConversionError(f"{what}: two params map onto the key '{key}'")
        out[key] = np.ascontiguousarray(_to_torch(value, path[-1], pointwise(key)))
    return out
