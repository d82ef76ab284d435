"""Sample quality against the number of model calls, for every solver, on the exact Gaussian-mixture oracle.

The model is the analytic denoiser of a Gaussian mixture (ddim_jax.GaussianMixture.eps_fn: the exact
E[eps | x_t], what a perfectly trained network outputs), so the only error left is the solver's. The
schedule is the paper's: linear betas 1e-4 .. 0.02, T = 1000. For each solver of
ddim_jax.solvers.SOLVERS (ddim with eta = 0, plus DDPM = ddim with eta = 1 as an extra row) and each
budget N of model calls, the solver runs with the number of steps S that makes exactly N calls:
S = N for ddim, DDPM and the DPM-Solver++ variants (one eps call per step), S = N - 1 for plms
(S + 1 calls for S >= 2: its first step is a Heun step). The script counts the calls of every
(solver, N) with a jax.debug.callback counter before measuring, and stops if a count is not N.

Quality: the energy distance (ddim_jax.energy_distance: 2 E|X - Y| - E|X - X'| - E|Y - Y'|, unbiased
U-statistics, so ~0 for two samples of the same law and possibly slightly negative) between the
--num_samples solver samples (from one fixed set of x_T draws, shared by all solvers) and one fixed
set of exact mixture samples of the same size. The floor is the same distance between two
independent exact sets (mean and std over --repeats pairs): differences below its std are noise.

One table per spacing in --spacing, then the issue's check: at 10 calls, is dpmpp_2m's energy
distance at most half of DDIM's? It is evaluated for every spacing (DDIM on the same spacing, and
DDIM on the first spacing), over --repeats independent (x_T, reference) draws.

    python benchmarks/solver_calls.py [--num_samples 4000] [--seed 0] [--calls 5,10,15,20,50]
        [--spacing uniform,trailing,karras,exponential,quadratic] [--mixture ring8] [--repeats 3]
        [--out benchmarks/RESULTS_solvers.md] [--smoke]

--smoke: 16 samples, 10 calls, the first spacing, 2 repeats: a quick test.

--out replaces this mixture's section (between its marker comments) in that markdown file, or appends
it (creating the file, with a title line, if needed); everything else in the file is left as it is.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # benchmarks/_machine.py

import ddim_jax as dj  # noqa: E402
from _machine import git_revision, machine_description  # noqa: E402

T = 1000
TITLE = "# Solvers: quality against model calls (oracle mixture)"
ROWS = ("ddim", "ddpm", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc", "plms")  # ddpm: ddim with eta = 1
ROW_NAMES = {"ddim": "ddim (eta=0)", "ddpm": "DDPM (ddim eta=1)"}
# The library's estimator, jitted: one fused program instead of a dozen eager [n, n] ops (~7x faster at n = 4000).
energy_distance = jax.jit(dj.energy_distance)


def make_mixture(name: str) -> tuple[dj.GaussianMixture, str]:
    if name == "ring8":  # the classic 8-Gaussians toy, inside [-1, 1]^2 like image data
        ang = np.arange(8) * 2 * np.pi / 8
        return (dj.GaussianMixture(np.stack([np.cos(ang), np.sin(ang)], 1), 0.1),
                "2-D, 8 equal-weight isotropic components, means on the unit circle, std 0.1")
    if name == "ring8_narrow":
        ang = np.arange(8) * 2 * np.pi / 8
        return (dj.GaussianMixture(np.stack([np.cos(ang), np.sin(ang)], 1), 0.05),
                "2-D, 8 equal-weight isotropic components, means on the unit circle, std 0.05")
    if name == "grid9":
        g = np.stack(np.meshgrid([-0.9, 0.0, 0.9], [-0.9, 0.0, 0.9]), -1).reshape(-1, 2)
        return dj.GaussianMixture(g, 0.03), "2-D, 9 equal-weight isotropic components on a 3x3 grid (pitch 0.9), std 0.03"
    if name == "d16":
        rng = np.random.default_rng(0)
        means = rng.uniform(-1, 1, (10, 16))
        stds = rng.uniform(0.05, 0.2, (10, 16))
        w = rng.uniform(0.5, 1.5, 10)
        return (dj.GaussianMixture(means, stds, w),
                "16-D, 10 components with unequal weights (0.5..1.5, normalised), means uniform in [-1, 1]^16, "
                "diagonal stds uniform in [0.05, 0.2] (numpy default_rng(0))")
    raise ValueError(f"unknown mixture {name!r}")


def steps_for(row: str, calls: int) -> int | None:
    """Steps S giving exactly ``calls`` model calls (None where no S does: plms with 2 calls)."""
    if row != "plms":
        return calls
    if calls == 1:
        return 1
    return None if calls == 2 else calls - 1


def run(row, eps_fn, schedule, x_T, S, spacing, key):
    solver = "ddim" if row == "ddpm" else row
    kw = dict(eta=1.0) if row == "ddpm" else {}
    return dj.sample(eps_fn, schedule, x_T, S, solver=solver, spacing=spacing, key=key, **kw)


def count_calls(row, gm, schedule, S, spacing, dim) -> int:
    """Model calls actually executed (not traced) by one sampling run, counted on the host."""
    n = [0]
    eps_fn = gm.eps_fn(schedule)

    def counted(x, t):
        jax.debug.callback(lambda _: n.__setitem__(0, n[0] + 1), t[0])
        return eps_fn(x, t)

    run(row, counted, schedule, jnp.zeros((4, dim)), S, spacing, jax.random.key(0)).block_until_ready()
    jax.effects_barrier()
    return n[0]


def fmt(v: float) -> str:
    return f"{v * 1e3:.2f}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_samples", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calls", default="5,10,15,20,50", help="comma-separated model-call budgets")
    p.add_argument("--spacing", default="uniform,trailing,karras,exponential,quadratic",
                   help="comma-separated spacings, one table each; the first is the reference for the check")
    p.add_argument("--mixture", default="ring8", choices=("ring8", "ring8_narrow", "grid9", "d16"))
    p.add_argument("--repeats", type=int, default=3,
                   help="independent (x_T, reference) draws for the 10-call check and the floor")
    p.add_argument("--out", default=None, help="markdown file whose section for this mixture is replaced")
    p.add_argument("--smoke", action="store_true", help="16 samples, 10 calls, one spacing: a quick test")
    args = p.parse_args(argv)
    if args.smoke:
        args.num_samples, args.calls, args.repeats = 16, "10", 2
        args.spacing = args.spacing.split(",")[0]  # another spacing runs the same code on other timesteps
    for s in args.spacing.split(","):
        if s not in dj.SPACINGS:
            p.error(f"unknown spacing {s!r}; one of {dj.SPACINGS}")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    t_start = time.perf_counter()
    calls = [int(c) for c in args.calls.split(",")]
    spacings = args.spacing.split(",")
    n = args.num_samples
    schedule = dj.make_schedule("linear", T)
    gm, desc = make_mixture(args.mixture)
    eps_fn = gm.eps_fn(schedule)
    root = jax.random.key(args.seed)

    def draws(r):
        k = jax.random.fold_in(root, r)
        kx, kref, kfloor, knoise = jax.random.split(k, 4)
        return (jax.random.normal(kx, (n, gm.dim)), gm.sample(kref, n), gm.sample(kfloor, n), knoise)

    # 1. Model calls per run, counted (host callback at each executed eps call).
    counts = {}
    for row in ROWS:
        for N in calls:
            S = steps_for(row, N)
            if S is not None:
                c = count_calls(row, gm, schedule, S, spacings[0], gm.dim)
                counts[row, N] = (S, c)
                if c != N:
                    raise SystemExit(f"{row} with S = {S} made {c} model calls, expected {N}")

    # 2. Floor: two independent exact sets.
    floors = []
    for r in range(args.repeats):
        _, ref, other, _ = draws(r)
        floors.append(float(energy_distance(other, ref)))

    # 3. One table per spacing (draw 0).
    x_T, ref, _, knoise = draws(0)
    ed = {}
    for sp in spacings:
        for row in ROWS:
            for N in calls:
                S = steps_for(row, N)
                if S is not None:
                    x = run(row, eps_fn, schedule, x_T, S, sp, knoise)
                    ed[sp, row, N] = float(energy_distance(x, ref))

    # 4. The issue's check at 10 calls, over the repeats (draw 0 is the tables').
    check = {}
    if 10 in calls:
        for r in range(args.repeats):
            x_T_r, ref_r, _, knoise_r = (x_T, ref, None, knoise) if r == 0 else draws(r)
            for sp in spacings:
                for row in ("ddim", "dpmpp_2m"):
                    check[r, sp, row] = (ed[sp, row, 10] if r == 0 else float(
                        energy_distance(run(row, eps_fn, schedule, x_T_r, 10, sp, knoise_r), ref_r)))
    elapsed = time.perf_counter() - t_start

    # Report.
    m = machine_description()
    cmd = "python " + shlex.join(["benchmarks/solver_calls.py"] + argv)
    L = [f"<!-- solver_calls:{args.mixture}:begin (written by benchmarks/solver_calls.py) -->",
         f"## Mixture `{args.mixture}`: {desc}", "",
         f"Command: `{cmd}`", "",
         f"Schedule: linear betas 1e-4 .. 0.02, T = {T}. {n} samples per cell from one fixed set of x_T draws; "
         f"reference: {n} exact mixture samples; seed {args.seed}. Runtime {elapsed:.0f} s (compilation included).",
         "",
         f"Machine: {m.get('Model name', m['platform'])}, {m['cpus_usable']} usable CPU(s) of {m['cpu_count']}, "
         f"jax {jax.__version__} ({jax.default_backend()}), python {m['python']}; checkout {git_revision()}; "
         f"load average at the end {os.getloadavg()[0]:.1f} (shared machine: the runtime is indicative only).", "",
         "Steps S used for N model calls (counted with a host callback on every executed eps call, "
         f"spacing `{spacings[0]}`; every count equals N): "
         + "; ".join(f"{ROW_NAMES.get(row, row)}: " + ", ".join(f"N={N}: S={counts[row, N][0]}" for N in calls
                                                                if (row, N) in counts) for row in ("ddim", "plms"))
         + ". ddim, DDPM, dpmpp_2m, dpmpp_3m, dpmpp_2m_sde and unipc make one call per step (S = N); plms makes "
           "S + 1 for S >= 2 (its first step is a Heun step: two calls), so S = N - 1.", "",
         f"Floor (energy distance between two independent exact sets of {n}): "
         + ", ".join(fmt(f) for f in floors) + f" (x 1e-3; mean {fmt(np.mean(floors))}, std "
         f"{fmt(np.std(floors, ddof=1) if len(floors) > 1 else 0.0)}). Values at or below about the floor's spread are "
         "indistinguishable from exact samples; the estimator is unbiased, so it can be negative.", ""]
    for sp in spacings:
        L += [f"### Spacing `{sp}`: energy distance x 1e-3 (lower is better)", "",
              "| solver | " + " | ".join(f"{N} calls" for N in calls) + " |",
              "|---|" + "---|" * len(calls)]
        for row in ROWS:
            cells = [fmt(ed[sp, row, N]) if (sp, row, N) in ed else "n/a" for N in calls]
            L.append(f"| {ROW_NAMES.get(row, row)} | " + " | ".join(cells) + " |")
        L.append("")
    if check:
        R = args.repeats
        ref_sp = spacings[0]
        L += ["### Check: at 10 model calls, is dpmpp_2m's energy distance at most half of DDIM's?", "",
              f"Energy distance x 1e-3, mean over {R} independent (x_T, reference) draws (draw 0 is the tables'); "
              f"ratios per draw, min .. max. \"vs DDIM `{ref_sp}`\" compares dpmpp_2m on that spacing with DDIM on "
              f"`{ref_sp}`. Where dpmpp_2m's distance is within the floor's spread its ratio is noise (it is at the floor, "
              "so the check holds by a wide margin).", "",
              "| spacing | DDIM | dpmpp_2m | 2M / DDIM (same spacing) | holds (all draws) | "
              f"2M / DDIM `{ref_sp}` | holds (all draws) |",
              "|---|---|---|---|---|---|---|"]
        for sp in spacings:
            d = np.array([check[r, sp, "ddim"] for r in range(R)])
            d0 = np.array([check[r, ref_sp, "ddim"] for r in range(R)])
            q = np.array([check[r, sp, "dpmpp_2m"] for r in range(R)])
            a, b = q / d, q / d0
            L.append(f"| {sp} | {fmt(d.mean())} | {fmt(q.mean())} | {a.min():.2f} .. {a.max():.2f} | "
                     f"{'yes' if np.all(a <= 0.5) else 'no'} | {b.min():.2f} .. {b.max():.2f} | "
                     f"{'yes' if np.all(b <= 0.5) else 'no'} |")
        L.append("")
    L.append(f"<!-- solver_calls:{args.mixture}:end -->")
    section = "\n".join(L)
    print(section)

    if args.out:
        path = pathlib.Path(args.out)
        text = path.read_text() if path.exists() else TITLE + "\n"
        begin, end = f"<!-- solver_calls:{args.mixture}:begin", f"<!-- solver_calls:{args.mixture}:end -->"
        i, j = text.find(begin), text.find(end)
        if i >= 0 and j > i:
            text = text[:i] + section + text[j + len(end):]
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
        path.write_text(text)
        print(f"\nwrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
