"""Per-op profile of one training step on this machine's XLA backend: where the step's time goes.

The step is ``ddim_jax.training.state.make_train_step`` of ``configs/paper.py:cifar10`` (the paper's 35.7M-parameter
UNet, dropout 0.1, Adam, EMA, the non-finite guard) at ``--batch`` on a 1-device mesh, fed a fixed random uint8
batch. After two warm-up calls, ``--steps`` calls run under ``jax.profiler.trace``; the trace's per-op events
(XLA:CPU's thunk executor records one per HLO instruction, with its name in the ``hlo_op`` stat) are summed
by instruction and classified with the compiled HLO:

- convolutions (the instruction or its fused computation holds a ``convolution``): forward when the JAX
  op name lies under ``jvp(`` but not ``transpose(``, else backward; a backward one whose output has the
  kernel's shape (``[kh, kw, cin, cout]``) is a filter gradient, else an input gradient;
- dots (attention, dense layers, the 1x1 shortcuts), forward or backward alike;
- reductions (fusions holding a ``reduce``: GroupNorm statistics, their gradients, the loss);
- layout copies and transposes;
- other elementwise fusions (swish, the normalisation itself, residual adds, dropout masks, concatenation,
  upsampling);
- the surroundings: every op outside the network's forward and backward (the JAX op name has no
  ``jvp(``): the timestep, noise and flip draws, the gradient all-reduce and norm, Adam, the EMA and the
  non-finite guard.

XLA:CPU runs independent ops concurrently on its thread pool, so summed op time may exceed the wall time
times one; shares are of the summed op time.

    python benchmarks/op_profile.py [--batch 16] [--steps 3] [--top 15] [--json PATH] [--smoke]

--smoke: a tiny UNet at 8x8, batch 2, one profiled step: a quick test.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import re
import sys
import tempfile
import time

import numpy as np
from _machine import ROOT, git_revision, machine_description, random_state, tiny_unet

sys.path.insert(0, str(ROOT))

CATEGORIES = ("conv forward", "conv backward: input gradient", "conv backward: filter gradient", "dots",
              "reductions", "layout copies / transposes", "other elementwise", "surroundings (optimizer, EMA, "
              "guard, draws)", "other")

_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\][^ ]* (\S+?)\((.*)$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OPNAME = re.compile(r'op_name="([^"]*)"')


def parse_hlo(text: str):
    """``{instruction: (shape, opcode, called computation, op_name)}`` and ``{computation: [(opcode, op_name)]}``."""
    instrs, comps, current = {}, collections.defaultdict(list), None
    for line in text.splitlines():
        if line and not line.startswith(" ") and "{" in line and "(" in line:
            current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, _, dims, opcode, rest = m.groups()
        shape = tuple(int(d) for d in dims.split(",") if d)
        calls = _CALLS.search(rest)
        op_name = _OPNAME.search(rest)
        op_name = op_name.group(1) if op_name else ""
        instrs[name] = (shape, opcode, calls.group(1) if calls else None, op_name)
        comps[current].append((opcode, op_name))
    return instrs, comps


def classify(name: str, instrs, comps) -> str:
    if name not in instrs:
        return "other"
    shape, opcode, called, op_name = instrs[name]
    inside = comps.get(called, []) + [(opcode, op_name)]
    opcodes = {o for o, _ in inside}
    names = [n for _, n in inside if n]
    if names and not any("jvp(" in n for n in names):
        return CATEGORIES[7]
    backward = any("transpose(" in n for n in names)
    if "convolution" in opcodes:
        kernel_like = len(shape) == 4 and (shape[1:3] in ((3, 3), (1, 1)) or shape[:2] in ((3, 3), (1, 1)))
        if kernel_like:
            return CATEGORIES[2]
        return CATEGORIES[1] if backward else CATEGORIES[0]
    if "dot" in opcodes:
        return CATEGORIES[3]
    if "reduce" in opcodes or "reduce-window" in opcodes:
        return CATEGORIES[4]
    if (opcodes <= {"copy", "transpose", "parameter", "bitcast"}
            or name.startswith(("transpose", "copy", "wrapped_copy"))):
        return CATEGORIES[5]
    if opcode == "fusion":
        return CATEGORIES[6]
    return CATEGORIES[8]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true", help="a tiny UNet at 8x8, batch 2, one step: a quick test")
    a = p.parse_args(argv)
    if a.smoke:
        a.batch, a.steps, a.top = 2, 1, 3
    return a


def main(argv=None):
    a = parse_args(argv)

    import jax
    from jax.profiler import ProfileData
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from configs.paper import get_config
    from ddim_jax.parallel import BATCH_AXES, as_train_mesh, make_mesh
    from ddim_jax.training.run import build
    from ddim_jax.training.state import cached_train_step

    c = tiny_unet(get_config("cifar10")) if a.smoke else get_config("cifar10")
    c.training.batch_size = a.batch
    mesh = as_train_mesh(make_mesh(jax.devices()[:1]))
    step = cached_train_step(build(c), mesh)
    size = c.data.image_size
    images = jax.device_put(np.random.default_rng(0).integers(0, 256, (1, a.batch, size, size, 3), dtype=np.uint8),
                            NamedSharding(mesh, P(None, BATCH_AXES)))
    labels = jax.device_put(np.zeros((1, a.batch), np.int32), NamedSharding(mesh, P(None, BATCH_AXES)))
    state = random_state(build(c), mesh)  # random weights: the op times do not depend on them
    compiled = step.lower(state, images, labels, {}).compile()
    instrs, comps = parse_hlo(compiled.as_text())
    for _ in range(2):
        state, m = step(state, images, labels)
        jax.block_until_ready(m)
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir):
            t0 = time.perf_counter()
            for _ in range(a.steps):
                state, m = step(state, images, labels)
                jax.block_until_ready(m)
            wall = (time.perf_counter() - t0) / a.steps
        profile = ProfileData.from_file(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0])
        per_op = collections.Counter()
        for plane in profile.planes:
            for line in plane.lines:
                for e in line.events:
                    stats = dict(e.stats)
                    if "hlo_op" in stats and str(stats.get("hlo_module", "")).startswith("jit_"):
                        per_op[stats["hlo_op"]] += e.duration_ns / 1e6 / a.steps
    total = sum(per_op.values())
    by_cat, count = collections.Counter(), collections.Counter()
    for name, ms in per_op.items():
        cat = classify(name, instrs, comps)
        by_cat[cat] += ms
        count[cat] += 1
    print(f"# cifar10 train step, batch {a.batch}, {jax.devices()[0].platform}, jax {jax.__version__}, "
          f"checkout {git_revision()}: wall {wall * 1e3:.0f} ms per step, summed op time {total:.0f} ms "
          f"({len(per_op)} ops)")
    print("| category | ms per step | share of op time | ops |")
    print("|---|---|---|---|")
    for cat in CATEGORIES:
        if count[cat]:
            print(f"| {cat} | {by_cat[cat]:.0f} | {by_cat[cat] / total:.1%} | {count[cat]} |")
    print(f"\ntop {a.top} ops:\n| op | category | ms per step | output shape |\n|---|---|---|---|")
    for name, ms in per_op.most_common(a.top):
        shape = instrs.get(name, ((),))[0]
        print(f"| {name} | {classify(name, instrs, comps)} | {ms:.1f} | {list(shape)} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"wall_ms": wall * 1e3, "op_ms": total, "by_category": dict(by_cat), "counts": dict(count),
                       "per_op": dict(per_op), "revision": git_revision(), "machine": machine_description()}, f,
                      indent=1)


if __name__ == "__main__":
    main()
