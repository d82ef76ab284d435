"""Each solver's default timestep spacing, chosen on evidence: every solver x spacing at 5, 10 and 20 model
calls on several exact Gaussian-mixture problems (energy distance) and on the digits model (FID).

Oracle part. A problem is a mixture (ddim_jax.GaussianMixture, whose eps_fn is the exact E[eps | x_t], so
all the error is the solver's) under a schedule (linear betas 1e-4 .. 0.02 or cosine, T = 1000):

  ring8      2-D, 8 isotropic components (std 0.1) on the unit circle (benchmarks/solver_calls.py's)
  d16_broad  16-D, 3 isotropic components, stds uniform in [0.18, 0.34], means normal(0, 0.1): broad
             overlapping components, the shape of the mixture on which `trailing` failed DPM-Solver++
  d16        16-D, 10 components, diagonal stds in [0.05, 0.2], unequal weights (solver_calls.py's)
  grid9      2-D, 9 isotropic components (std 0.03) on a 3x3 grid (solver_calls.py's)
  d64        64-D, 4 isotropic components, stds uniform in [0.1, 0.4], means uniform in [-1, 1]^64,
             unequal weights

For each problem, solver of ddim_jax.SOLVERS, spacing of ddim_jax.SPACINGS and budget N of model calls, the
solver runs with the S that makes N calls (S = N; plms: S = N - 1, its first step is a Heun step; counted
with a host callback before measuring) from --draws independent (x_T, noise key, reference) draws of
--num_samples each, and the energy distance (ddim_jax.energy_distance, unbiased) to that draw's exact
reference is recorded (mean and spread over the draws). The floor is the distance between two independent
exact sets (--floor_pairs pairs): its std is the noise of one cell.

The rule. For each (problem, N) the best spacing is the one with the lowest mean distance; a spacing's ratio
there is max(d, noise) / max(best, noise), noise = 2 x the floor's std for that problem (distances below it
are exact samples as far as this estimator can tell, so they tie). A solver's default is the spacing with
the lowest worst-case ratio over all (problem, N) cells of the oracle and, where measured, of the digits
(FID / best FID at that N): the most robust one, not the one that wins most often; among the spacings that
converge: whose first step at 50 steps has alpha-bar <= 0.01 under every schedule (`quadratic` starts at
0.8 T at every S, where the cosine schedule's alpha-bar is 0.093: x_T ~ N(0, I) is not x_t there, a bias
that more calls do not remove).

Digits part (--digits WORKDIR_OR_MODEL): digits-CNN feature FID against the 297 held-out digits, the
measurement of benchmarks/digits_quality.py (its held_out_fid), of --digits_num samples (one fixed set of x_T)
for each solver at N = 5, 10, 20 calls on its candidate spacings: the --candidates spacings with the lowest
oracle worst-case ratio, plus the solver's current default (--digits_spacings all: every spacing).

    python benchmarks/solver_defaults.py [--parts oracle,digits] [--digits runs/digits] [--digits_num 1000]
        [--num_samples 2000] [--draws 3] [--json benchmarks/results/solver_defaults.json]
        [--out benchmarks/RESULTS_solvers.md] [--smoke]

Each part's results go into --json (a part not run is read back from it; --parts report runs none), and the
report (written into --out between its marker comments, or at the top after the title) is made from everything
there.

--smoke: ring8 only, 32 samples, 2 draws, N = 3 and 10, two spacings, three solvers, and a random tiny digits
model with 8 samples at N = 3; everything written into a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # benchmarks/: _machine, solver_calls

import ddim_jax as dj  # noqa: E402
from _machine import git_revision, machine_description, random_model, sampling_batch, scratch_dir, tiny_unet  # noqa: E402,E501
from solver_calls import count_calls, energy_distance, make_mixture, steps_for  # noqa: E402

from ddim_jax.solvers import DEFAULT_SPACING  # noqa: E402

T = 1000
MIXTURES = ("ring8", "d16_broad", "d16", "grid9", "d64")
SCHEDULES = ("linear", "cosine")
BEGIN, END = "<!-- solver_defaults:begin (written by benchmarks/solver_defaults.py) -->", "<!-- solver_defaults:end -->"
TITLE = "# Solvers: quality against model calls (oracle mixture)"
CONVERGE_STEPS, START_ALPHA_BAR = 50, 0.01  # a default must start where alpha-bar <= 0.01 by 50 steps


def mixture(name: str) -> tuple[dj.GaussianMixture, str]:
    if name == "d16_broad":
        rng = np.random.default_rng(0)
        means, stds = rng.normal(0.0, 0.1, (3, 16)), rng.uniform(0.18, 0.34, 3)
        return (dj.GaussianMixture(means, stds),
                "16-D, 3 equal-weight isotropic components, stds uniform in [0.18, 0.34], means normal(0, 0.1) "
                "(numpy default_rng(0))")
    if name == "d64":
        rng = np.random.default_rng(1)
        means, stds, w = rng.uniform(-1, 1, (4, 64)), rng.uniform(0.1, 0.4, 4), rng.uniform(0.5, 1.5, 4)
        return (dj.GaussianMixture(means, stds, w),
                "64-D, 4 isotropic components, stds uniform in [0.1, 0.4], means uniform in [-1, 1]^64, weights "
                "uniform in [0.5, 1.5] (numpy default_rng(1))")
    return make_mixture(name)


def split(s: str) -> list[str]:
    return [v for v in s.split(",") if v]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="oracle,digits",
                   help="which measurements to run: oracle and/or digits; report: none, the report from --json")
    p.add_argument("--mixtures", default=",".join(MIXTURES))
    p.add_argument("--schedules", default=",".join(SCHEDULES))
    p.add_argument("--solvers", default=",".join(dj.SOLVERS))
    p.add_argument("--spacings", default=",".join(dj.SPACINGS))
    p.add_argument("--calls", default="5,10,20", help="model-call budgets")
    p.add_argument("--num_samples", type=int, default=2000, help="oracle samples per cell and per reference")
    p.add_argument("--draws", type=int, default=3, help="independent (x_T, noise, reference) draws per cell")
    p.add_argument("--floor_pairs", type=int, default=5, help="pairs of exact sets for the floor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--digits", default="runs/digits", help="the digits model (a workdir or a model directory)")
    p.add_argument("--digits_num", type=int, default=1000, help="digits samples per cell")
    p.add_argument("--digits_calls", default="5,10,20", help="model-call budgets on the digits")
    p.add_argument("--digits_spacings", default="candidates", help="candidates, all, or a list of spacings")
    p.add_argument("--candidates", type=int, default=3, help="oracle-best spacings per solver tried on the digits")
    p.add_argument("--json", default="benchmarks/results/solver_defaults.json")
    p.add_argument("--out", default=None, help="markdown file whose solver_defaults section is replaced")
    p.add_argument("--smoke", action="store_true", help="a tiny run of every code path, written to a temporary dir")
    args = p.parse_args(argv)
    if args.smoke:
        args.mixtures, args.calls, args.num_samples, args.draws, args.floor_pairs = "ring8", "3,10", 32, 2, 2
        args.spacings, args.solvers, args.digits_num, args.candidates = "uniform,trailing", "ddim,dpmpp_2m,plms", 8, 1
        args.digits_calls = "3"
        args.parts = "oracle,digits"
    for name, values, allowed in (("parts", args.parts, ("oracle", "digits", "report")),
                                  ("mixtures", args.mixtures, MIXTURES), ("schedules", args.schedules, SCHEDULES),
                                  ("solvers", args.solvers, dj.SOLVERS),
                                  ("spacings", args.spacings, dj.SPACINGS)):
        bad = [v for v in split(values) if v not in allowed]
        if bad or not split(values):
            p.error(f"--{name} must be a comma-separated list of {allowed}; got {values!r}")
    if args.draws < 1 or args.floor_pairs < 2 or args.num_samples < 2 or args.digits_num < 2:
        p.error("--draws must be >= 1, --floor_pairs >= 2, --num_samples and --digits_num >= 2")
    return args


# ----------------------------------------------------------------------------------------------
# Measurements.


def run_oracle(args) -> dict:
    t0 = time.perf_counter()
    calls, solvers, spacings = [int(c) for c in split(args.calls)], split(args.solvers), split(args.spacings)
    n, root = args.num_samples, jax.random.key(args.seed)
    counted = {}
    problems = {}
    for mix in split(args.mixtures):
        gm, desc = mixture(mix)
        for sched_name in split(args.schedules):
            schedule = dj.make_schedule(sched_name, T)
            eps_fn = gm.eps_fn(schedule)
            pkey = jax.random.fold_in(root, len(problems))
            floors = []
            for r in range(args.floor_pairs):
                ka, kb = jax.random.split(jax.random.fold_in(pkey, 10_000 + r))
                floors.append(float(energy_distance(gm.sample(ka, n), gm.sample(kb, n))))
            cells = {}
            for r in range(args.draws):
                kx, kref, knoise = jax.random.split(jax.random.fold_in(pkey, r), 3)
                x_T, ref = jax.random.normal(kx, (n, gm.dim)), gm.sample(kref, n)
                for solver in solvers:
                    for N in calls:
                        S = steps_for(solver, N)
                        if (solver, N) not in counted:  # model calls actually executed, once per (solver, N)
                            counted[solver, N] = count_calls(solver, gm, schedule, S, "uniform", gm.dim)
                            if counted[solver, N] != N:
                                raise SystemExit(f"{solver} with S = {S} made {counted[solver, N]} calls, not {N}")
                        for sp in spacings:
                            x = dj.sample(eps_fn, schedule, x_T, S, solver=solver, spacing=sp, key=knoise)
                            cells.setdefault(f"{solver}|{sp}|{N}", []).append(float(energy_distance(x, ref)))
            problems[f"{mix}/{sched_name}"] = {"mixture": mix, "schedule": sched_name, "description": desc,
                                               "floor": floors, "cells": cells}
            print(f"oracle: {mix}/{sched_name} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return {"problems": problems, "calls": calls, "solvers": solvers, "spacings": spacings, "num_samples": n,
            "draws": args.draws, "floor_pairs": args.floor_pairs, "seed": args.seed,
            "steps": {f"{s}|{N}": steps_for(s, N) for s in solvers for N in calls},
            "seconds": time.perf_counter() - t0}


def run_digits(args, oracle: dict | None) -> dict:
    from digits_quality import held_out_fid

    from ddim_jax import experiments as ex
    from ddim_jax.loading import load_model

    t0 = time.perf_counter()
    calls, solvers = [int(c) for c in split(args.digits_calls)], split(args.solvers)
    workdir = random_model("digits", tiny_unet) if args.smoke else args.digits
    model = load_model(workdir)
    score, floor = held_out_fid()
    batch = sampling_batch(model, args.digits_num, 250)
    rows, tried = [], {}
    for solver in solvers:
        if args.digits_spacings == "all":
            tried[solver] = list(dj.SPACINGS)
        elif args.digits_spacings != "candidates":
            tried[solver] = split(args.digits_spacings)
        else:
            if oracle is None:
                raise SystemExit("--digits_spacings candidates needs the oracle part (run it, or keep its --json)")
            ranked = sorted(robustness(oracle, solver)["worst"].items(), key=lambda kv: kv[1])
            tried[solver] = list(dict.fromkeys([sp for sp, _ in ranked[:args.candidates]]
                                               + [oracle["defaults"][solver]]))
        for sp in tried[solver]:
            for N in calls:
                t1 = time.perf_counter()
                imgs = ex.generate(model, args.digits_num, batch, steps_for(solver, N), seed=0, solver=solver,
                                   spacing=sp)
                rows.append({"solver": solver, "spacing": sp, "calls": N, "steps": steps_for(solver, N),
                             "fid": score(imgs), "seconds": time.perf_counter() - t1})
                print(f"digits: {solver} {sp} N={N}: FID {rows[-1]['fid']:.2f}", file=sys.stderr, flush=True)
    return {"model": str(model.source), "num_samples": args.digits_num, "floor": floor, "rows": rows,
            "tried": tried, "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------
# The rule.


def cell_means(oracle: dict, solver: str) -> dict:
    """{(problem, N): {spacing: mean distance}} and the problem's noise level."""
    out = {}
    for pname, prob in oracle["problems"].items():
        for N in oracle["calls"]:
            out[pname, N] = {sp: float(np.mean(prob["cells"][f"{solver}|{sp}|{N}"])) for sp in oracle["spacings"]}
    return out


def noise(prob: dict) -> float:
    return 2.0 * float(np.std(prob["floor"], ddof=1))


def robustness(oracle: dict, solver: str, digits: dict | None = None) -> dict:
    """Per spacing: worst-case and geometric-mean ratio to the best spacing over the oracle cells (and the
    digits cells, among the spacings measured there), and the cells it is best in."""
    ratios = {}  # spacing -> [(cell, ratio)]
    for (pname, N), vals in cell_means(oracle, solver).items():
        eps = noise(oracle["problems"][pname])
        best = min(max(v, eps) for v in vals.values())
        for sp, v in vals.items():
            ratios.setdefault(sp, []).append((f"{pname} N={N}", max(v, eps) / best))
    if digits is not None:
        rows = [r for r in digits["rows"] if r["solver"] == solver]
        ratios = {sp: v for sp, v in ratios.items() if any(r["spacing"] == sp for r in rows)}
        for N in sorted({r["calls"] for r in rows}):
            vals = {r["spacing"]: r["fid"] for r in rows if r["calls"] == N}
            for sp in ratios:
                ratios[sp].append((f"digits FID N={N}", vals[sp] / min(vals.values())))
    worst = {sp: max(r for _, r in v) for sp, v in ratios.items()}
    return {"worst": worst, "where": {sp: max(v, key=lambda cr: cr[1])[0] for sp, v in ratios.items()},
            "geomean": {sp: float(np.exp(np.mean(np.log([r for _, r in v])))) for sp, v in ratios.items()},
            "wins": {sp: sum(r == 1.0 for _, r in v) for sp, v in ratios.items()},
            "cells": len(next(iter(ratios.values())))}


def start_alpha_bar(spacing: str, schedule: str, steps: int = CONVERGE_STEPS) -> float:
    """alpha-bar at the first (largest) timestep of ``spacing`` at ``steps`` steps: x_T ~ N(0, I) stands in for
    x_t there, which holds only if it is ~0."""
    sched = dj.make_schedule(schedule, T)
    return float(sched.alpha_bar(int(dj.make_timesteps(T, steps, spacing, schedule=sched)[-1])))


def converging(spacings, schedules) -> set:
    """The spacings whose first step at CONVERGE_STEPS steps has alpha-bar <= START_ALPHA_BAR under every schedule:
    the others start from a noise level x_T is not at, a bias that more calls do not remove."""
    return {sp for sp in spacings if max(start_alpha_bar(sp, sch) for sch in schedules) <= START_ALPHA_BAR}


def choose(oracle: dict, digits: dict | None, eligible=None) -> dict:
    """Per solver, the spacing of ``eligible`` (default: all) with the lowest worst-case ratio."""
    out = {}
    for solver in oracle["solvers"]:
        rob = robustness(oracle, solver, digits if digits and any(r["solver"] == solver for r in digits["rows"])
                         else None)
        worst = {sp: w for sp, w in rob["worst"].items() if eligible is None or sp in eligible}
        out[solver] = min(worst, key=worst.get)
    return out


# ----------------------------------------------------------------------------------------------
# The report.


def fmt(v: float) -> str:
    return f"{v * 1e3:.2f}"


def report(results: dict) -> str:
    oracle, digits = results.get("oracle"), results.get("digits")
    m = results["machine"]
    L = [BEGIN, "## Default spacings, chosen on evidence (benchmarks/solver_defaults.py)", "",
         f"Machine: {m['cpu']}, {m['cpus']} usable CPU(s), jax {m['jax']} ({m['backend']}); checkout {m['revision']}; "
         "a shared machine (other jobs running; load averages below): times are indicative only."]
    if oracle:
        L += ["", f"Oracle part: `{oracle['command']}`, {oracle['seconds'] / 60:.1f} min, load average "
              f"{oracle['load']} at its end. {oracle['num_samples']} samples per cell, "
              f"{oracle['draws']} independent draws (x_T, noise key, exact reference) per cell: cells are mean +- "
              f"std over the draws, x 1e-3. Model calls N -> steps S: S = N, plms S = N - 1 (counted with a host "
              f"callback). Floor: {oracle['floor_pairs']} pairs of independent exact sets; noise = 2 x its std.", "",
              "| problem | mixture | floor mean +- std (x 1e-3) |", "|---|---|---|"]
        for pname, prob in oracle["problems"].items():
            L.append(f"| {pname} | {prob['description']} | {fmt(np.mean(prob['floor']))} +- "
                     f"{fmt(np.std(prob['floor'], ddof=1))} |")
    if digits:
        L += ["", f"Digits part: `{digits['command']}`, {digits['seconds'] / 60:.1f} min, load average "
              f"{digits['load']} at its end. Model {digits['model']}; {digits['num_samples']} "
              f"samples per cell (one fixed set of x_T), FID in the digits CNN's features against the 297 held-out "
              f"digits (benchmarks/digits_quality.py's measurement; its floor, the 1,500 training digits, is "
              f"{digits['floor']:.2f})."]
    if oracle:
        schedules = sorted({p["schedule"] for p in oracle["problems"].values()})
        eligible = converging(oracle["spacings"], schedules)
        chosen, unrestricted = choose(oracle, digits, eligible), choose(oracle, digits)
        L += ["", "### The choice", "",
              "Ratio to the best spacing in each (problem, N) cell, distances below the noise counted as the noise; "
              "worst case over the cells (oracle, and the digits FID where measured: a spacing not measured on the "
              "digits is not a candidate), the geometric mean, and how many cells the spacing is best in. A default "
              f"must also converge: its first step at {CONVERGE_STEPS} steps must have alpha-bar <= {START_ALPHA_BAR} "
              "under every schedule (x_T ~ N(0, I) stands in for x_t there; where alpha-bar is larger the samples "
              "keep a bias that no number of calls removes). alpha-bar at the first step, at 5 / 10 / 20 / "
              f"{CONVERGE_STEPS} steps:", "",
              "| spacing | " + " | ".join(schedules) + " | converges |", "|---|" + "---|" * (len(schedules) + 1)]
        for sp in oracle["spacings"]:
            L.append(f"| {sp} | " + " | ".join(" / ".join(f"{start_alpha_bar(sp, sch, S):.2g}"
                                                          for S in (5, 10, 20, CONVERGE_STEPS)) for sch in schedules)
                     + f" | {'yes' if sp in eligible else '**no**'} |")
        L += ["", "| solver | default when measured | chosen | worst-case ratio (cell) | geo-mean ratio | best in | "
              "lowest worst case without the convergence condition |", "|---|---|---|---|---|---|---|"]
        for solver in oracle["solvers"]:
            use = digits if digits and any(r["solver"] == solver for r in digits["rows"]) else None
            rob = robustness(oracle, solver, use)
            sp, u = chosen[solver], unrestricted[solver]
            L.append(f"| {solver} | {oracle['defaults'][solver]} | **{sp}** | "
                     f"{rob['worst'][sp]:.2f} ({rob['where'][sp]}) | {rob['geomean'][sp]:.2f} | "
                     f"{rob['wins'][sp]} of {rob['cells']} | {u} ({rob['worst'][u]:.2f}, {rob['where'][u]}) |")
        L += ["", "Worst-case ratio over the oracle cells alone, every spacing (lower is more robust; the best of "
              "each row in bold):", "",
              "| solver | " + " | ".join(oracle["spacings"]) + " |", "|---|" + "---|" * len(oracle["spacings"])]
        for solver in oracle["solvers"]:
            w = robustness(oracle, solver)["worst"]
            L.append(f"| {solver} | " + " | ".join((f"**{w[sp]:.1f}**" if w[sp] == min(w.values()) else f"{w[sp]:.1f}")
                                                   for sp in oracle["spacings"]) + " |")
        L += ["", "Where no spacing has worst-case ratio 1, no single spacing is best everywhere: the chosen one is "
              "the least bad in its worst cell."]
        L += goal_check(oracle, chosen)
        for solver in oracle["solvers"]:
            L += ["", f"### `{solver}`: energy distance x 1e-3, mean +- std over the draws (best of each row in bold)",
                  "", "| problem | N | " + " | ".join(oracle["spacings"]) + " |",
                  "|---|---|" + "---|" * len(oracle["spacings"])]
            for pname, prob in oracle["problems"].items():
                for N in oracle["calls"]:
                    vals = {sp: prob["cells"][f"{solver}|{sp}|{N}"] for sp in oracle["spacings"]}
                    best = min(np.mean(v) for v in vals.values())
                    cells = [(f"**{fmt(np.mean(v))}**" if np.mean(v) == best else fmt(np.mean(v)))
                             + (f" +- {fmt(np.std(v, ddof=1))}" if len(v) > 1 else "") for v in vals.values()]
                    L.append(f"| {pname} | {N} | " + " | ".join(cells) + " |")
    if digits:
        calls = sorted({r["calls"] for r in digits["rows"]})
        L += ["", "### Digits: FID (digits-CNN features) against model calls, each solver on the spacings tried", "",
              "| solver | spacing | " + " | ".join(f"{N} calls" for N in calls) + " |",
              "|---|---|" + "---|" * len(calls)]
        val = {(r["solver"], r["spacing"], r["calls"]): r["fid"] for r in digits["rows"]}
        for solver, sps in digits["tried"].items():
            for sp in sps:
                L.append(f"| {solver} | {sp} | " + " | ".join(f"{val[solver, sp, N]:.2f}" for N in calls) + " |")
    L.append(END)
    return "\n".join(L)


def goal_check(oracle: dict, chosen: dict) -> list[str]:
    """DPM-Solver++ 2M at 10 calls at most half of DDIM's energy distance, each on its chosen default."""
    if "dpmpp_2m" not in chosen or "ddim" not in chosen or 10 not in oracle["calls"]:
        return []
    sp2, spd = chosen["dpmpp_2m"], chosen["ddim"]
    L = ["", f"### Goal: at 10 calls dpmpp_2m (on `{sp2}`) at most half of DDIM's (on `{spd}`) energy distance", "",
         "Per draw (same x_T and reference for both); \"at the floor\": dpmpp_2m's mean is below the noise, so its "
         "ratio is noise and the goal holds if DDIM is above twice the noise.", "",
         "| problem | DDIM | dpmpp_2m | ratio per draw | holds |", "|---|---|---|---|---|"]
    for pname, prob in oracle["problems"].items():
        d = np.array(prob["cells"][f"ddim|{spd}|10"])
        q = np.array(prob["cells"][f"dpmpp_2m|{sp2}|10"])
        eps = noise(prob)
        r = q / d
        if q.mean() <= eps:
            holds = "yes (at the floor)" if d.mean() > 2 * eps else "n/a (both at the floor)"
        else:
            holds = "yes" if np.all(r <= 0.5) else "no"
        L.append(f"| {pname} | {fmt(d.mean())} | {fmt(q.mean())} | {r.min():.2f} .. {r.max():.2f} | {holds} |")
    return L


def write_section(path: pathlib.Path, section: str):
    text = path.read_text() if path.exists() else TITLE + "\n"
    i, j = text.find(BEGIN), text.find(END)
    if i >= 0 and j > i:
        text = text[:i] + section + text[j + len(END):]
    else:  # at the top, after the title line
        head, _, rest = text.partition("\n")
        text = head + "\n\n" + section + "\n\n" + rest.lstrip("\n")
    path.write_text(text)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.smoke:
        tmp = scratch_dir()
        args.json, args.out = os.path.join(tmp, "solver_defaults.json"), os.path.join(tmp, "RESULTS_solvers.md")
    path = pathlib.Path(args.json)
    results = json.loads(path.read_text()) if path.exists() else {}
    parts = split(args.parts)
    cmd = "python " + shlex.join(["benchmarks/solver_defaults.py"] + argv)
    if "oracle" in parts:
        results["oracle"] = run_oracle(args)
        results["oracle"]["defaults"] = dict(DEFAULT_SPACING)  # the library's defaults when it was measured
        results["oracle"].update(command=cmd, load=f"{os.getloadavg()[0]:.1f}")
        results.pop("digits", None)  # its candidates came from the previous oracle run
    if "digits" in parts:
        results["digits"] = run_digits(args, results.get("oracle"))
        results["digits"].update(command=cmd, load=f"{os.getloadavg()[0]:.1f}")
    m = machine_description()
    results["machine"] = {"cpu": m.get("Model name", m["platform"]), "cpus": m["cpus_usable"], "jax": jax.__version__,
                          "backend": jax.default_backend(), "revision": git_revision(),
                          "load": f"{os.getloadavg()[0]:.1f}"}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    section = report(results)
    print(section)
    if args.out:
        write_section(pathlib.Path(args.out), section)
        print(f"\nwrote {args.out} and {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
