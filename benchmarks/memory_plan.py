"""The memory plan of the paper's training setups: what one device holds per train step.

For each setup of ``configs/paper.py`` (cifar10, celeba64, lsun_church256), each per-device batch, compute
dtype and remat setting, ``ddim_jax.training.memory.memory_plan`` compiles the train step ahead of time
on a 1-device mesh of this machine's backend (abstract inputs: nothing is allocated) and reports the
parameters, EMA and Adam state (float32 whatever the compute dtype) and XLA's temporaries (activations kept
for the backward pass, gradients, workspace: ``memory_analysis().temp_size_in_bytes``). ``python
train.py`` prints the same plan at start for the real mesh and refuses a run whose total exceeds the
device's memory.

``--sd15 FSDPS``: rows for Stable Diffusion 1.5's UNet (``unet2d_condition`` with ``cond_unet.SD15``, 859.5M
parameters) on 64x64x4 latents with a 77x768 text context per example (random: the frozen text encoder is
not counted), ``--sd15_batch`` latents per device, on a ``(devices / fsdp, fsdp)`` mesh of ``--devices``
devices for each fsdp size given: parameters, EMA and Adam state split over ``fsdp`` devices
(``training.mesh``), and the temporaries of the partitioned program (they hold the whole gathered
parameters and their whole gradients during the backward pass). On CPU the script gives itself
``--devices`` host devices (XLA's ``--xla_force_host_platform_device_count``) before JAX starts, so
the mesh exists without the accelerators: nothing is allocated, the program is only compiled.

The temporaries are those of the backend the script runs on: XLA:CPU's figures (fusion, layouts,
scheduling) are not a GPU's or a TPU's; run it on the accelerator to plan for it.

    python benchmarks/memory_plan.py [--setups cifar10,celeba64,lsun_church256] [--batches 8,32,128]
        [--dtypes float32,bfloat16] [--remat 0,1] [--sd15 1,4,8,16] [--sd15_batch 1] [--devices 16]
        [--json PATH] [--smoke]

--smoke: cifar10's setup with a tiny UNet at 8x8, batch 2, float32, no remat, and a one-level SD-structured
UNet at 8x8 on a (1, 2) mesh: a quick test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from _machine import ROOT, git_revision, machine_description, tiny_unet

sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setups", default="cifar10,celeba64,lsun_church256")
    p.add_argument("--batches", default="8,32,128")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--remat", default="0,1")
    p.add_argument("--sd15", default="", help="fsdp sizes of the SD 1.5 UNet's rows ('' = none), e.g. 1,4,8,16")
    p.add_argument("--sd15_batch", type=int, default=1, help="latents per device of the SD 1.5 rows")
    p.add_argument("--devices", type=int, default=16, help="devices of the SD 1.5 rows' mesh (host devices on CPU)")
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true", help="cifar10 with a tiny UNet, batch 2: a quick test")
    a = p.parse_args(argv)
    if a.smoke:
        a.setups, a.batches, a.dtypes, a.remat = "cifar10", "2", "float32", "0"
        a.sd15, a.sd15_batch, a.devices = "2", 1, 2
    return a


# --smoke's SD-structured UNet: one level of SD 1.5's blocks at 64 channels, cross-attention in its mid block
# only (a compile as quick as the tiny cifar10 row's); its 3x3 kernels are above the FSDP threshold: split.
SMOKE_SD = dict(block_out_channels=(64,), down_block_types=("DownBlock2D",),
                up_block_types=("UpBlock2D",), layers_per_block=1, attention_head_dim=2,
                cross_attention_dim=32, norm_groups=8)


def sd15_run(batch: int, dtype: str, smoke: bool):
    """A training run of SD 1.5's UNet (--smoke: :data:`SMOKE_SD`) on 64x64x4 latents (8x8 with --smoke),
    global batch ``batch``: a :class:`ddim_jax.training.run.Run` whose objective is the denoising loss given a
    text context per example."""
    import jax
    import jax.numpy as jnp

    from ddim_jax.cond_unet import SD15
    from ddim_jax.config import base_config
    from ddim_jax.diffusion import per_example_loss
    from ddim_jax.models import ModelSpec
    from ddim_jax.training.objectives import Diffusion
    from ddim_jax.training.run import Record, Run

    arch = dict(SD15, **(SMOKE_SD if smoke else {}))
    side = 8 if smoke else 64
    arch.pop("in_channels"), arch.pop("out_channels")
    spec = ModelSpec("unet2d_condition", arch, side, 4,
                     {"name": "linear", "num_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012}, "epsilon")
    width = arch["cross_attention_dim"]

    class TextConditioned(Diffusion):
        def loss(self, params, frozen, x0, labels, keys, step, dropout_key):
            fold = lambda i: jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)  # noqa: E731
            context = jax.vmap(lambda k: jax.random.normal(k, (77, width), jnp.float32))(fold(5))
            t = jax.vmap(lambda k: jax.random.randint(k, (), 0, 1000, jnp.int32))(fold(0))
            noise = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], jnp.float32))(fold(1))
            eps = lambda x, tt: self.model.apply({"params": params}, x, tt, context)  # noqa: E731
            return jnp.mean(per_example_loss(eps, self.schedule, x0, t, noise)), {}

    c = base_config()
    c.data.update(image_size=side, channels=4)
    c.training.update(batch_size=batch, compute_dtype=dtype)
    return Run(c, Record(), spec, TextConditioned(c, spec, spec.build(dtype)))


def main(argv=None):
    a = parse_args(argv)

    import jax

    from configs.paper import get_config
    from ddim_jax.parallel import make_mesh
    from ddim_jax.training.memory import GiB, memory_plan
    from ddim_jax.training.run import build

    mesh = make_mesh(jax.devices()[:1])
    device = jax.devices()[0]
    print(f"# memory plan per device, {device.platform} ({device.device_kind}), jax {jax.__version__}, "
          f"checkout {git_revision()}")
    print("| setup | batch / device | compute dtype | remat | params + EMA + Adam GiB | temporaries GiB | "
          "total GiB | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for setup in filter(None, a.setups.split(",")):
        for batch in map(int, a.batches.split(",")):
            for dtype in a.dtypes.split(","):
                for remat in (bool(int(r)) for r in a.remat.split(",")):
                    c = tiny_unet(get_config(setup)) if a.smoke else get_config(setup)
                    c.training.update(batch_size=batch, compute_dtype=dtype, remat=remat)
                    t0 = time.time()
                    plan = memory_plan(build(c), mesh)
                    secs = time.time() - t0
                    state = plan.params + plan.ema + plan.optimizer
                    row = dict(setup=setup, batch=batch, dtype=dtype, remat=remat, state=state,
                               temporaries=plan.temporaries, total=plan.total, compile_s=secs)
                    rows.append(row)
                    print(f"| {setup} | {batch} | {dtype} | {'yes' if remat else 'no'} | {state / GiB:.2f} | "
                          f"{plan.temporaries / GiB:.2f} | {plan.total / GiB:.2f} | {secs:.0f} |", flush=True)
    if a.sd15:
        rows += sd15_rows(a)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": f"{device.platform} {device.device_kind}", "jax": jax.__version__,
                       "revision": git_revision(), "machine": machine_description(), "rows": rows}, f, indent=1)



def sd15_rows(a) -> list[dict]:
    """The SD 1.5 UNet's rows: one per fsdp size and compute dtype, on a (devices / fsdp, fsdp) mesh."""
    import jax

    from ddim_jax.parallel import train_mesh
    from ddim_jax.training.memory import GiB, memory_plan
    from ddim_jax.training.state import make_train_step

    sizes = [int(f) for f in a.sd15.split(",")]
    if jax.device_count() < a.devices:
        print(f"\nSD 1.5 rows skipped: they need --devices {a.devices} devices and JAX has {jax.device_count()} "
              "(on CPU run this script as a command, which gives itself host devices before JAX starts)")
        return []
    devices = jax.devices()[:a.devices]
    print(f"\n# SD 1.5 UNet{' (--smoke: a few channels)' if a.smoke else ''}, {a.sd15_batch} latent(s) per device, "
          f"{a.devices} devices, per device")
    print("| fsdp | mesh | compute dtype | params GiB | EMA GiB | Adam GiB | batch MiB | temporaries GiB | total GiB | "
          "compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for dtype in a.dtypes.split(","):
        for fsdp in sizes:
            if a.devices % fsdp:
                raise SystemExit(f"--sd15 fsdp size {fsdp} does not divide --devices {a.devices}")
            run = sd15_run(a.sd15_batch * a.devices, dtype, a.smoke)
            mesh = train_mesh(devices, (a.devices // fsdp, fsdp))
            t0 = time.time()
            plan = memory_plan(run, mesh, make_train_step(run, mesh))
            secs = time.time() - t0
            row = dict(setup="sd15_unet" + ("_smoke" if a.smoke else ""), fsdp=fsdp, mesh=list(plan.mesh),
                       batch=a.sd15_batch, dtype=dtype, remat=False, params=plan.params, ema=plan.ema,
                       optimizer=plan.optimizer, batch_bytes=plan.batch, temporaries=plan.temporaries,
                       total=plan.total, compile_s=secs)
            rows.append(row)
            print(f"| {fsdp} | {plan.mesh[0]} x {plan.mesh[1]} | {dtype} | {plan.params / GiB:.2f} | "
                  f"{plan.ema / GiB:.2f} | {plan.optimizer / GiB:.2f} | {plan.batch / 2**20:.2f} | "
                  f"{plan.temporaries / GiB:.2f} | {plan.total / GiB:.2f} | {secs:.0f} |", flush=True)
    return rows


def _host_devices(argv) -> None:
    """On CPU, ``--devices`` host devices for the SD 1.5 rows' mesh (set before JAX starts)."""
    a = parse_args(argv)
    flags = os.environ.get("XLA_FLAGS", "")
    if a.sd15 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={a.devices}".strip()


if __name__ == "__main__":
    _host_devices(sys.argv[1:])
    main()
