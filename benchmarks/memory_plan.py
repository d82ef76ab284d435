"""The memory plan of the paper's training setups: what one device holds per train step.

For each setup of ``configs/paper.py`` (cifar10, celeba64, lsun_church256), each per-device batch, compute
dtype and remat setting, ``ddim_jax.training.memory.memory_plan`` compiles the train step ahead of time
on a 1-device mesh of this machine's backend (abstract inputs: nothing is allocated) and reports the
parameters, EMA and Adam state (float32 whatever the compute dtype) and XLA's temporaries (activations kept
for the backward pass, gradients, workspace: ``memory_analysis().temp_size_in_bytes``). ``python
train.py`` prints the same plan at start for the real mesh and refuses a run whose total exceeds the
device's memory.

The temporaries are those of the backend the script runs on: XLA:CPU's figures (fusion, layouts,
scheduling) are not a GPU's or a TPU's; run it on the accelerator to plan for it.

    python benchmarks/memory_plan.py [--setups cifar10,celeba64,lsun_church256] [--batches 8,32,128]
        [--dtypes float32,bfloat16] [--remat 0,1] [--json PATH] [--smoke]

--smoke: cifar10's setup with a tiny UNet at 8x8, batch 2, float32, no remat: a quick test.
"""

from __future__ import annotations

import argparse
import json
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
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true", help="cifar10 with a tiny UNet, batch 2: a quick test")
    a = p.parse_args(argv)
    if a.smoke:
        a.setups, a.batches, a.dtypes, a.remat = "cifar10", "2", "float32", "0"
    return a


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
    for setup in a.setups.split(","):
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
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": f"{device.platform} {device.device_kind}", "jax": jax.__version__,
                       "revision": git_revision(), "machine": machine_description(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
