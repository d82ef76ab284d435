"""On-disk layout of a converted checkpoint: DST/config.json and the params saved with orbax under DST/params."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

CONFIG_NAME = "config.json"
PARAMS_NAME = "params"


def is_converted_checkpoint(path: str | os.PathLike) -> bool:
    """True if ``path`` is a directory holding config.json and a params/ directory."""
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, CONFIG_NAME)) and os.path.isdir(os.path.join(path, PARAMS_NAME))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def save_converted(dst: str | os.PathLike, config: dict, params: Any, overwrite: bool = False) -> str:
    """Write ``config`` (JSON) and ``params`` (orbax) to the directory ``dst``; returns its absolute path.

    An existing ``dst`` is refused unless ``overwrite``; even then only an empty directory or a previous
    converted checkpoint is replaced. The checkpoint is written beside ``dst`` and renamed into place.
    """
    dst = os.path.abspath(os.fspath(dst))
    if os.path.lexists(dst):
        if not overwrite:
            raise FileExistsError(f"destination exists: {dst} (pass --overwrite / overwrite=True to replace it)")
        if not (is_converted_checkpoint(dst) or (os.path.isdir(dst) and not os.listdir(dst))):
            raise FileExistsError(f"destination exists and is not a converted checkpoint, refusing to replace it: {dst}")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".tmp-", dir=parent)
    try:
        params = jax.tree_util.tree_map(lambda a: np.asarray(a, dtype=np.float32), params)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, PARAMS_NAME), params)
            ckptr.wait_until_finished()
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(_jsonable(config), f, indent=2, sort_keys=True)
            f.write("\n")
        if os.path.lexists(dst):
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def load_converted(path: str | os.PathLike) -> tuple[dict, Any]:
    """Read a converted checkpoint: returns (config dict, params pytree of float32 jax arrays).

    ``config["model"]`` has tuples for ch_mult and attn_resolutions, so ``UNet(**config["model"])`` is hashable.
    """
    path = os.path.abspath(os.fspath(path))
    if not is_converted_checkpoint(path):
        raise FileNotFoundError(f"not a converted checkpoint (expected {CONFIG_NAME} and {PARAMS_NAME}/): {path}")
    with open(os.path.join(path, CONFIG_NAME)) as f:
        config = json.load(f)
    if "model" in config:
        config["model"] = unet_kwargs_from_config(config)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(path, PARAMS_NAME))
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype=jnp.float32), params)
    return config, params


def unet_kwargs_from_config(config: dict) -> dict:
    """The UNet constructor kwargs stored in a converted checkpoint's config (lists turned into tuples)."""
    model = dict(config["model"])
    for key in ("ch_mult", "attn_resolutions"):
        if key in model:
            model[key] = tuple(model[key])
    return model
