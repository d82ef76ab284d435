"""The device mesh and moving batches between the host and the devices.

Everything data-parallel here runs on a 1-D mesh named ``'data'`` over every device of every host.
A batch whose size does not divide by the device count is padded, sharded, and unpadded after the
gather; :func:`shard_rows` and :func:`gather_rows` are the one place that does it.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A 1-D ``'data'`` mesh over ``devices`` (default: all devices of all processes)."""
    return jax.sharding.Mesh(np.asarray(jax.devices() if devices is None else list(devices)), ("data",))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """``x`` with zero rows appended up to ``rows`` rows (so every batch has one shape, one compilation)."""
    x = np.asarray(x)
    return x if len(x) >= rows else np.concatenate([x, np.zeros((rows - len(x),) + x.shape[1:], x.dtype)])


def shard_rows(x: np.ndarray, mesh: jax.sharding.Mesh) -> tuple[jax.Array, int]:
    """``x`` (the same full array on every process) padded with zero rows to a multiple of the mesh
    size and sharded over its first axis: ``(array, number of real rows)``."""
    x = np.asarray(x)
    n = len(x)
    x = pad_rows(x, round_up(max(n, 1), mesh.devices.size))
    return jax.device_put(x, NamedSharding(mesh, P("data"))), n


def gather_rows(x: jax.Array, n: int | None = None) -> np.ndarray:
    """A batch-sharded array on the host (all processes' rows), its first ``n`` rows."""
    out = np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return out if n is None else out[:n]


def on_main(fn, what: str):
    """Runs ``fn()`` on process 0 only; if it fails there, every process raises (rather than the others
    waiting forever at their next collective). Returns ``fn()``'s result on process 0, None elsewhere."""
    result, error = None, None
    if jax.process_index() == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 -- re-raised below, after the others have been told
            error = e
    if jax.process_count() > 1:
        failed = bool(multihost_utils.broadcast_one_to_all(np.asarray(error is not None)))
        if failed and error is None:
            raise RuntimeError(f"{what} failed on process 0 (see its error)")
    if error is not None:
        raise error
    return result


def host(x) -> np.ndarray:
    """This process's copy of a replicated (possibly multi-host) array."""
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def host_tree(tree):
    """:func:`host` over a pytree."""
    return jax.tree.map(host, tree)
