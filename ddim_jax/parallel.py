"""The device meshes and moving batches between the host and the devices.

Training and sampling run on a 2-D mesh ``('data', 'fsdp')`` (:func:`train_mesh`; a 1-D ``'data'`` mesh,
:func:`make_mesh`, counts as ``fsdp = 1``): the batch's rows are split over all its devices (both axes,
:data:`BATCH_AXES`), and the parameters (and in training their EMA and Adam's moments) are split over
``'fsdp'`` (:func:`fsdp_spec` says how, from each array's shape) and replicated over ``'data'``; with
``fsdp = 1`` everything is replicated, which is plain data parallelism.
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


# The training mesh's axes, and the axes a batch's rows are split over (all devices, 'data' major).
MESH_AXES = ("data", "fsdp")
BATCH_AXES = MESH_AXES
# Arrays with fewer elements than this stay replicated under FSDP: gathering them costs more in latency
# than their copies cost in memory (biases, norms, small kernels).
FSDP_MIN_SIZE = 2 ** 14


def make_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A 1-D ``'data'`` mesh over ``devices`` (default: all devices of all processes)."""
    return jax.sharding.Mesh(np.asarray(jax.devices() if devices is None else list(devices)), ("data",))


def train_mesh(devices: Sequence[jax.Device] | None = None, shape: Sequence[int] | None = None) -> jax.sharding.Mesh:
    """A 2-D ``('data', 'fsdp')`` mesh over ``devices`` (default: all devices of all processes) of ``shape``
    ``(data, fsdp)`` (default: ``(number of devices, 1)``). Consecutive devices share an ``'fsdp'`` group (on a
    multi-device host, the parameters are gathered between neighbours)."""
    devices = np.asarray(jax.devices() if devices is None else list(devices))
    shape = (devices.size, 1) if shape is None else tuple(shape)
    if len(shape) != 2 or shape[0] * shape[1] != devices.size:
        raise ValueError(f"mesh shape must be (data, fsdp) with data x fsdp = {devices.size} devices; got {shape}")
    return jax.sharding.Mesh(devices.reshape(shape), MESH_AXES)


def as_train_mesh(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
    """``mesh`` as a training mesh: a 1-D ``'data'`` mesh becomes ``(its devices, 1)``; a training mesh is
    returned as it is."""
    if tuple(mesh.axis_names) == MESH_AXES:
        return mesh
    if tuple(mesh.axis_names) == ("data",):
        return jax.sharding.Mesh(mesh.devices.reshape(-1, 1), MESH_AXES)
    raise ValueError(f"a training mesh has the axes {MESH_AXES} (or 'data' alone); got {mesh.axis_names}")


def fsdp_size(mesh: jax.sharding.Mesh) -> int:
    return int(dict(mesh.shape).get("fsdp", 1))


def fsdp_axis(shape: Sequence[int], fsdp: int, min_size: int = FSDP_MIN_SIZE) -> int | None:
    """The axis along which an array of ``shape`` is split over ``fsdp`` devices: its largest axis divisible
    by ``fsdp`` (the last of equals); None (replicated) when ``fsdp`` is 1, the array has fewer than
    ``min_size`` elements or no axis divides."""
    if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return None
    fits = [i for i, n in enumerate(shape) if n % fsdp == 0]
    return max(fits, key=lambda i: (shape[i], i)) if fits else None


def fsdp_spec(shape: Sequence[int], fsdp: int, min_size: int = FSDP_MIN_SIZE) -> P:
    """The PartitionSpec of a parameter (or its EMA, or an Adam moment) of ``shape`` on a mesh with ``fsdp``
    devices on its ``'fsdp'`` axis: split along :func:`fsdp_axis`, replicated otherwise (and over
    ``'data'``). The one place that decides how the train state is sharded."""
    axis = fsdp_axis(shape, fsdp, min_size)
    return P() if axis is None else P(*([None] * axis), "fsdp")


def spec_axis(spec: P) -> int | None:
    """The axis an :func:`fsdp_spec` splits over ``'fsdp'`` (None: replicated)."""
    return next((i for i, name in enumerate(spec) if name == "fsdp"), None)


def fsdp_specs(tree, mesh: jax.sharding.Mesh):
    """:func:`fsdp_spec` of each array (or ShapeDtypeStruct) of ``tree`` on ``mesh``."""
    fsdp = fsdp_size(mesh)
    return jax.tree.map(lambda x: fsdp_spec(x.shape, fsdp), tree)


def fsdp_shardings(tree, mesh: jax.sharding.Mesh):
    """The NamedSharding on ``mesh`` of each array of ``tree`` (:func:`fsdp_specs`)."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), fsdp_specs(tree, mesh))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """A batch's rows split over every device of ``mesh``: over ``'data'`` on a 1-D mesh, over
    :data:`BATCH_AXES` (``'data'`` major) on a training mesh."""
    return NamedSharding(mesh, P("data") if tuple(mesh.axis_names) == ("data",) else P(BATCH_AXES))


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """``x`` with zero rows appended up to ``rows`` rows (so every batch has one shape, one compilation)."""
    x = np.asarray(x)
    return x if len(x) >= rows else np.concatenate([x, np.zeros((rows - len(x),) + x.shape[1:], x.dtype)])


def shard_rows(x: np.ndarray, mesh: jax.sharding.Mesh) -> tuple[jax.Array, int]:
    """``x`` (the same full array on every process) padded with zero rows to a multiple of the mesh
    size and sharded over its first axis (:func:`batch_sharding`): ``(array, number of real rows)``."""
    x = np.asarray(x)
    n = len(x)
    x = pad_rows(x, round_up(max(n, 1), mesh.devices.size))
    return jax.device_put(x, batch_sharding(mesh)), n


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


def gather_host(x) -> np.ndarray:
    """The whole of ``x`` on the host, whatever its sharding: a replicated array's local copy; a sharded
    one assembled from its shards on the host (no device holds a second whole copy), or, when some of its
    shards live on other processes, gathered across processes (every process takes part)."""
    if not isinstance(x, jax.Array) or x.is_fully_replicated:
        return host(x)
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def gather_host_tree(tree):
    """:func:`gather_host` over a pytree, one array at a time (a cross-process gather holds one array's
    whole copy per device at once, never the tree's)."""
    return jax.tree.map(gather_host, tree)
