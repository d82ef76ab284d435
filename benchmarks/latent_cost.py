"""The latent diffusion claim, measured: training-step and sampling cost of the same denoiser on 32x32x1
pixels and on the 8x8x3 latents of the digits' f = 4 autoencoder (configs/latent_digits.py's network and
autoencoder architecture), in the same process on the same devices.

    python benchmarks/latent_cost.py [--batch 64] [--steps 20] [--sample_steps 50] [--smoke]

The pixel rows: the same network on the images, and a cheaper pixel-space peer without attention at
32x32 (the quadratic cost a latent model avoids). Per row: the median seconds of one train step (the
latent step includes encoding the batch with the frozen autoencoder), the encoder's own share, XLA's
temporaries for the step, and the seconds to draw a batch of samples with DDIM (the latent row includes
decoding them). The autoencoder's weights are random, drawn on the host (``ddim_jax.nets.random_params``: speed
does not depend on them), so this needs no trained run; so are the denoiser's (``_machine.random_state``: no
initialiser to compile). The batch is placed on the training mesh exactly
as ``memory_plan`` describes it, so the calls and ``memory_plan`` share one compiled step instead of
compiling the same program twice.
``--smoke``: the network with its first level only, without its cross-attention (the mid block's remains),
one device, one example, one untimed and one timed step, 2 DDIM steps, and the latent row only (its code is
the pixel rows' plus the encoder): a quick test.
"""

import argparse
import os
import statistics
import sys
import time

import jax
import numpy as np
from _machine import ROOT, random_state, scratch_dir

sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed train steps per row")
    p.add_argument("--sample_steps", type=int, default=50)
    p.add_argument("--smoke", action="store_true", help="a one-level network, batch 1, one step: a quick test")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.steps, args.sample_steps = 1, 1, 2
    return args


def main(argv=None):
    args = parse_args(argv)

    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from configs.latent_digits import get_config
    from ddim_jax import experiments as ex
    from ddim_jax import models
    from ddim_jax.autoencoder import DIGITS_F4
    from ddim_jax.nets import random_params
    from ddim_jax.parallel import BATCH_AXES, as_train_mesh, make_mesh
    from ddim_jax.training.run import resolve
    from ddim_jax.training.memory import memory_plan
    from ddim_jax.training.state import make_train_step

    sample_mesh = make_mesh(jax.devices()[:1] if args.smoke else None)
    mesh = as_train_mesh(sample_mesh)  # the same devices, with the train step's axes
    tmp = scratch_dir()
    ae = models.ModelSpec("autoencoder_kl", DIGITS_F4, 32, 1, None, None)
    models.save(os.path.join(tmp, "ae"), ae, random_params(ae.param_shapes()))
    rows = []
    names = ["pixel 32x32x1", "pixel 32x32x1, no attention at 32x32", "latent 8x8x3"]
    if args.smoke:  # the latent row runs every line the pixel rows do, and the encoder's timing
        names = names[-1:]
    for name in names:
        c = get_config()
        c.training.batch_size = args.batch
        if name.startswith("pixel"):
            c.latent.autoencoder = ""
        else:
            c.latent.autoencoder = os.path.join(tmp, "ae")
            c.latent.scale_factor = 1.0
        if args.smoke:  # one level, cross-attention in the mid block only: a quicker compile
            c.model.update(block_out_channels=(32,), down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",))
        if "no attention" in name:  # a cheaper pixel-space peer: no attention at 32x32 (the first level)
            c.model.update(down_block_types=("DownBlock2D",) + c.model.down_block_types[1:],
                           up_block_types=c.model.up_block_types[:-1] + ("UpBlock2D",))
        run = resolve(c, os.path.join(tmp, "unused"))
        frozen = jax.device_put(run.frozen, NamedSharding(mesh, P()))
        step = make_train_step(run, mesh)
        state = random_state(run, mesh)
        rng = np.random.default_rng(0)
        rowsharding = NamedSharding(mesh, P(None, BATCH_AXES))
        images = jax.device_put(rng.integers(0, 256, (1, args.batch, 32, 32, 1), dtype=np.uint8), rowsharding)
        labels = jax.device_put(rng.integers(0, 10, (1, args.batch), dtype=np.int32), rowsharding)
        for _ in range(1 if args.smoke else 2):  # compile (and warm up)
            state, m = step(state, images, labels, frozen)
        jax.block_until_ready(m)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, m = step(state, images, labels, frozen)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        plan = memory_plan(run, mesh, step)
        spec = run.spec
        encode_s = 0.0
        if run.first_stage is not None:
            x = jax.device_put(np.asarray(images[0], np.float32) / 127.5 - 1.0, NamedSharding(mesh, P(BATCH_AXES)))
            enc = jax.jit(spec.encode)
            params = {"autoencoder": frozen["autoencoder"]}
            enc(params, x).block_until_ready()
            t = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                enc(params, x).block_until_ready()
                t.append(time.perf_counter() - t0)
            encode_s = statistics.median(t)
        model_params = step.objective.model_params(jax.device_get(state.ema_params), jax.device_get(frozen))
        model = ex.Model(spec, model_params, sample_mesh)
        ex.generate(model, args.batch, args.batch, args.sample_steps, labels="all", progress=False)  # compile
        t0 = time.perf_counter()
        ex.generate(model, args.batch, args.batch, args.sample_steps, labels="all", progress=False)
        sample_s = time.perf_counter() - t0
        rows.append((name, statistics.median(times), encode_s, plan.temporaries, sample_s))
        print(f"{name}: step {rows[-1][1] * 1e3:.1f} ms, encoder {encode_s * 1e3:.1f} ms, temporaries "
              f"{plan.temporaries / 2**20:.0f} MiB, {args.batch} samples x {args.sample_steps} DDIM steps "
              f"{sample_s:.2f} s", flush=True)
    lt = rows[-1]
    print(f"\n{jax.device_count()} {jax.devices()[0].platform} device(s), batch {args.batch}, "
          f"{args.sample_steps} DDIM steps")
    print("| space | train step (ms) | of which encoding (ms) | step temporaries (MiB) | sampling a batch (s) |")
    print("|---|---|---|---|---|")
    for name, step_s, enc_s, temp, samp in rows:
        print(f"| {name} | {step_s * 1e3:.1f} | {enc_s * 1e3:.1f} | {temp / 2**20:.0f} | {samp:.2f} |")
    for row in rows[:-1]:  # "pixel / latent", "pixel, no attention at 32x32 / latent"
        label = row[0].replace(" 32x32x1", "") + " / latent"
        print(f"| {label} | {row[1] / lt[1]:.1f}x | | {row[3] / max(lt[3], 1):.1f}x | {row[4] / lt[4]:.1f}x |")


if __name__ == "__main__":
    main()
