"""The scan sampler against the same DDIM step driven by a Python loop of jitted calls.

Model: the exact Gaussian-mixture denoiser (ddim_jax.GaussianMixture) in 64 dimensions, batch 256,
so the measurement is the sampler's own overhead, not a network's FLOPs. For each S, both
variants are compiled first, then timed over --repeats runs (median), each ending in
block_until_ready. The loop variant is the usual hand-written sampler: one jitted
(model + step) call per timestep, with the step's t and alpha-bars passed from the host.

    python benchmarks/sampler_scan_vs_loop.py [--steps 10 100 1000] [--repeats 5] [--smoke]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import ddim_jax as dj


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--components", type=int, default=8)
    p.add_argument("--smoke", action="store_true", help="S = 2, one repeat, a tiny mixture: a quick test")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.repeats, args.batch, args.dim, args.components = [2], 1, 4, 2, 2
    return args


def main(argv=None):
    args = parse_args(argv)

    schedule = dj.make_schedule("linear", 1000)
    means = np.random.default_rng(0).uniform(-0.8, 0.8, (args.components, args.dim))
    eps_fn = dj.GaussianMixture(means, 0.1).eps_fn(schedule)
    x_T = jax.random.normal(jax.random.key(0), (args.batch, args.dim))

    @jax.jit
    def loop_step(x, t, a_t, a_prev):
        eps = eps_fn(x, jnp.full((x.shape[0],), t, jnp.int32))
        return dj.ddim_step(x, eps, a_t=a_t, a_prev=a_prev)[0]

    def loop_sample(x, S):
        tau = dj.make_timesteps(1000, S)[::-1]
        prev = np.concatenate([tau[1:], [-1]])
        a_t, a_p = schedule.alpha_bar(tau), schedule.alpha_bar(prev)
        for i in range(S):
            x = loop_step(x, tau[i], a_t[i], a_p[i])
        return x

    def scan_sample(x, S):
        return dj.ddim_sample(eps_fn, schedule, x, S)

    def timed(fn, S):
        t0 = time.perf_counter()
        fn(x_T, S).block_until_ready()
        first = time.perf_counter() - t0
        runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn(x_T, S).block_until_ready()
            runs.append(time.perf_counter() - t0)
        return first, statistics.median(runs)

    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.devices()[0].device_kind}, "
          f"{platform.processor() or platform.machine()}; batch {args.batch}, dim {args.dim}, "
          f"{args.components} components, median of {args.repeats}")
    print("| S | scan: first call (s) | scan: per step (us) | loop: per step (us) | loop / scan |")
    print("|---|---|---|---|---|")
    for S in args.steps:
        scan_first, scan = timed(scan_sample, S)
        _, loop = timed(loop_sample, S)
        np.testing.assert_allclose(scan_sample(x_T, S), loop_sample(x_T, S), atol=1e-4)  # same samples
        print(f"| {S} | {scan_first:.3f} | {scan / S * 1e6:.1f} | {loop / S * 1e6:.1f} | {loop / scan:.1f}x |")


if __name__ == "__main__":
    main()
