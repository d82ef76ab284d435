"""Reading weights files into state dicts: ``{key: numpy array}`` (torch tensors' floats as float32).

``.safetensors`` (needs only ``safetensors``), ``.npz`` (numpy, no pickles) and PyTorch files (``.pth``,
``.bin``, ``.ckpt``, ``.pt``: ``torch.load(weights_only=True)``, so torch is needed only for them). It
imports nothing of the project's models: :mod:`ddim_jax.convert` and :mod:`ddim_jax.lpips` read with it.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any, Mapping

import numpy as np


class ConversionError(ValueError):
    """A checkpoint that cannot be read or converted; the message names the offending file, key or setting."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """``TypeName: message`` on one line (library messages can span several), cut at ``limit`` characters."""
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:limit]}{'...' if len(msg) > limit else ''}"


def to_numpy(key: str, value: Any) -> np.ndarray:
    """A state dict entry (a torch tensor or an array) as a numpy array, floats as float32."""
    if hasattr(value, "detach"):  # torch.Tensor
        import torch

        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.to(torch.float32)
        return value.numpy()
    if isinstance(value, np.ndarray):
        return value
    raise ConversionError(f"checkpoint entry '{key}' is a {type(value).__name__}, not a tensor")


def unwrap(obj: Any, path: str) -> tuple[dict, str | None]:
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
    return {k: to_numpy(k, v) for k, v in obj.items()}, note


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], str | None]:
    """Read a weights file into {key: float32/int numpy array}; returns it and a note on the entry taken.

    ``.safetensors`` needs only ``safetensors`` and ``.npz`` only numpy; ``.bin``/``.ckpt``/``.pth``/``.pt``
    need ``torch``. A file that cannot be read raises a one-line :class:`ConversionError` naming it.
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
            raise ConversionError(f"cannot read {path} as a safetensors file ({one_line(e)})") from None
        return unwrap(sd, path)
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as z:
                sd = {k: z[k] for k in z.files}
        except (ValueError, EOFError, OSError, zipfile.BadZipFile) as e:
            raise ConversionError(f"cannot read {path} as an .npz file of arrays ({one_line(e)})") from None
        return unwrap(sd, path)
    try:
        import torch
    except ImportError:
        raise ImportError(f"reading {os.path.basename(path)} needs the 'torch' package (pip install torch); "
                          ".safetensors and .npz files do not") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the path
        raise ConversionError(f"cannot read {path} with torch.load(weights_only=True) ({one_line(e)})") from None
    return unwrap(obj, path)
