"""What the LPIPS term costs an autoencoder's train step: configs/autoencoder_digits.py's step (L1 + KL, the
PatchGAN and its adaptive weight switched on) without and with ``loss.perceptual_weight`` x LPIPS (VGG16),
in the same process on the same devices.

    python benchmarks/lpips_cost.py [--batch 32] [--steps 10] [--image_size 32] [--smoke]

The LPIPS weights are random arrays of VGG16's and the heads' shapes (speed does not depend on their
values), so this needs no weights file; the autoencoder's and the PatchGAN's are random too, drawn on the host
(``_machine.random_state``: no initialiser to compile). The two steps are timed in alternation. Per row: the median
seconds of one train step and XLA's temporaries for it. The batch is placed on the training mesh exactly
as ``memory_plan`` describes it, so the calls reuse the step it compiles instead of compiling the same
program again. ``--smoke``: one 16x16 image on one device, a one-level 8-channel autoencoder and a one-layer
PatchGAN, one untimed and one timed step, and the LPIPS row only (its step is the other row's plus the
LPIPS term; the with / without ratio needs both): a quick test.
"""

import argparse
import statistics
import sys

import jax
import numpy as np

from _machine import ROOT, interleaved, random_state

sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed train steps per row")
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--smoke", action="store_true", help="one 16x16 image, one device, a tiny autoencoder and PatchGAN, "
                   "one step, the LPIPS row only: a quick test")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.steps, args.image_size = 1, 1, 16
    return args


def main(argv=None):
    args = parse_args(argv)

    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from configs.autoencoder_digits import get_config
    from ddim_jax import lpips
    from ddim_jax.parallel import BATCH_AXES, as_train_mesh, make_mesh
    from ddim_jax.training.memory import memory_plan
    from ddim_jax.training.run import build
    from ddim_jax.training.state import make_train_step

    mesh = as_train_mesh(make_mesh(jax.devices()[:1] if args.smoke else None))
    rng = np.random.default_rng(0)
    weights = jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(np.float32), lpips.param_shapes())
    images = jax.device_put(rng.integers(0, 256, (1, args.batch, args.image_size, args.image_size, 1), dtype=np.uint8),
                            NamedSharding(mesh, P(None, BATCH_AXES)))
    runs, plans, states = {}, {}, {}
    names = ["L1 + KL + PatchGAN", "L1 + KL + PatchGAN + LPIPS"]
    if args.smoke:  # the LPIPS row runs every line the other row does, and the LPIPS term
        names = names[-1:]
    for name in names:
        c = get_config()
        c.data.image_size = args.image_size
        c.training.batch_size = args.batch
        c.loss.disc_start = 0
        if args.smoke:  # the same step (VGG16 is fixed) around the smallest autoencoder and PatchGAN
            c.model.update(block_out_channels=(8,), norm_groups=8)
            c.loss.update(disc_layers=1, disc_channels=8)
        frozen = {}
        if "LPIPS" in name:  # the objective reads these names only to know the term is on
            c.loss.update(lpips_vgg16="random", lpips_heads="random")
            frozen = {"lpips": weights}
        frozen = jax.device_put(frozen, NamedSharding(mesh, P()))
        run = build(c)
        step, states[name] = make_train_step(run, mesh), random_state(run, mesh)
        plans[name] = memory_plan(run, mesh, step).temporaries

        def run(name=name, step=step, frozen=frozen):
            states[name], m = step(states[name], images, None, frozen)
            jax.block_until_ready(m)

        run()  # the first call (the program memory_plan compiled)
        if not args.smoke:
            run()  # warm up
        runs[name] = run
    times = interleaved(runs, args.steps)  # alternating, so background load hits both rows alike
    rows = [(name, statistics.median(times[name]), plans[name]) for name in runs]
    print(f"\n{jax.device_count()} {jax.devices()[0].platform} device(s), batch {args.batch}, "
          f"{args.image_size}x{args.image_size}x1 images")
    print("| loss | train step (ms) | step temporaries (MiB) |")
    print("|---|---|---|")
    for name, step_s, temp in rows:
        print(f"| {name} | {step_s * 1e3:.1f} | {temp / 2**20:.0f} |")
    if len(rows) == 2:
        print(f"| with / without LPIPS | {rows[1][1] / rows[0][1]:.2f}x | {rows[1][2] / max(rows[0][2], 1):.2f}x |")


if __name__ == "__main__":
    main()
