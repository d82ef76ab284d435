"""What one device holds while training, and the refusal of a run that cannot fit.

:func:`memory_plan` compiles the train step ahead of time for abstract inputs (nothing is allocated;
the later calls reuse the compiled program) and adds up, per device: the parameters, the EMA copy, the
optimizer state (each the device's shards under the mesh's ``fsdp``, whole when replicated), one
dispatch's batch, and XLA's temporaries (activations kept for the backward pass, the gathered parameters,
gradients, workspace: ``memory_analysis().temp_size_in_bytes`` of the partitioned program).
:func:`check_fits` compares the total with the device's memory (an accelerator's ``bytes_limit``; on
CPU the host memory available now, shared by the process's devices).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddim_jax import files
from ddim_jax.parallel import as_train_mesh, fsdp_size
from ddim_jax.training.state import abstract_state, cached_train_step

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes one device holds during a train step."""

    params: int
    ema: int
    optimizer: int
    batch: int
    temporaries: int
    limit: int  # the device's memory (bytes)
    device: str
    mesh: tuple = (1, 1)  # (data, fsdp)

    @property
    def total(self) -> int:
        return self.params + self.ema + self.optimizer + self.batch + self.temporaries

    def summary(self) -> str:
        parts = ", ".join(f"{name} {size(getattr(self, name))}" for name in
                          ("params", "ema", "optimizer", "batch", "temporaries"))
        return (f"memory per device ({self.device}), mesh data {self.mesh[0]} x fsdp {self.mesh[1]}: "
                f"{size(self.total)} of {size(self.limit)} ({parts}; "
                "temporaries: activations, gradients and workspace, from XLA's memory analysis)")


def size(n: int) -> str:
    """Bytes for people: GiB from 1 GiB up, else MiB."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2 ** 20:.1f} MiB"


def device_memory(device) -> int:
    """Bytes of memory of ``device``: an accelerator's allocator limit; on CPU the host memory available
    now, divided among this process's devices (they share it)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return files.available_memory() // max(len(jax.local_devices(backend=device.platform)), 1)


def _bytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def device_bytes(tree) -> int:
    """Bytes one device holds of ``tree``'s ShapeDtypeStructs: each one's shard under its sharding."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def memory_plan(run, mesh, step=None) -> MemoryPlan:
    """The plan of a :class:`~ddim_jax.training.run.Run`'s train step on ``mesh`` (``step``: the train step if
    already made; it is compiled here for the full dispatch of ``training.steps_per_dispatch`` steps)."""
    t, data = run.config.training, run.config.data
    mesh = as_train_mesh(mesh)
    step = cached_train_step(run, mesh) if step is None else step
    state = abstract_state(run, mesh)
    k, b = t.steps_per_dispatch, t.batch_size
    rows = step.batch_sharding
    images = jax.ShapeDtypeStruct((k, b, data.image_size, data.image_size, data.channels), jnp.uint8, sharding=rows)
    labels = jax.ShapeDtypeStruct((k, b), jnp.int32, sharding=rows)
    frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())),
                          step.objective.frozen_shapes())
    stats = step.lower(state, images, labels, frozen).compile().memory_analysis()
    per_device_batch = (_bytes(images) + _bytes(labels)) // mesh.devices.size
    device = next(dev for dev in mesh.devices.flat if dev.process_index == jax.process_index())  # one of ours
    return MemoryPlan(params=device_bytes(state.params) + _bytes(frozen), ema=device_bytes(state.ema_params),
                      optimizer=device_bytes(state.opt_state),
                      batch=per_device_batch, temporaries=int(getattr(stats, "temp_size_in_bytes", 0) or 0),
                      limit=device_memory(device), device=f"{device.platform}:{device.id}",
                      mesh=(mesh.devices.shape[0], fsdp_size(mesh)))


def check_fits(plan: MemoryPlan, config) -> None:
    """A one-line ValueError when the plan exceeds the device's memory, naming what to change."""
    if plan.total <= plan.limit:
        return
    t = config.training
    hints = ["a smaller training.batch_size (or more devices)"]
    data, fsdp = plan.mesh
    if data > 1 and data % 2 == 0:
        hints.append(f"training.mesh=({data // 2}, {2 * fsdp}) (params, EMA and Adam state split over {2 * fsdp} "
                     "devices)")
    if t.steps_per_dispatch > 1:
        hints.append("training.steps_per_dispatch=1")
    if not t.remat:
        hints.append("training.remat=True")
    if t.compute_dtype == "float32":
        hints.append("training.compute_dtype='bfloat16'")
    raise ValueError(f"training.batch_size={t.batch_size} needs {size(plan.total)} per device (params "
                     f"{size(plan.params)}, EMA {size(plan.ema)}, optimizer {size(plan.optimizer)}, activations and "
                     f"gradients {size(plan.temporaries)}) and {plan.device} has {size(plan.limit)}: try "
                     f"{', or '.join(hints)}")
