"""Digits FID against the number of model calls: the teacher with DDIM, DPM-Solver++ 2M, UniPC and PLMS (each on
its default spacing, ddim_jax.solvers.DEFAULT_SPACING) at 1 .. 50 calls, and distilled students at their own
step counts, in one plot (benchmarks/results/fid_vs_calls.png).

FID is benchmarks/digits_quality.py's measurement (held_out_fid: digits-CNN features, the samples against
the 297 held-out digits), of --num samples from one fixed set of x_T (seed 0) per point. N model calls are
S = N steps, except PLMS (S + 1 calls for S >= 2, so S = N - 1; no S makes 2 calls). A student
(``--student NAME=DIR``, a model directory or a workdir) is sampled with its own default sampler (a distilled
model's spec records its spacing; a consistency model samples with its multistep rule) at the step counts
given after ``@`` (``--student pd=runs/pd/round_4@4``), or else at the one its spec records; one step is one
model call. A NAME given more than once is one curve (``--student pd=runs/pd/rounds/steps_4 --student
pd=runs/pd/rounds/steps_2``: a progressive student's rounds). ``--point NAME=CALLS:FID,...`` adds points
measured elsewhere.

    python benchmarks/fid_vs_calls.py [--workdir runs/digits] [--num 1000] [--calls 1,2,3,4,5,7,10,15,20,30,50]
        [--solvers ddim,dpmpp_2m,unipc,plms] [--student NAME=DIR[@S,...]] [--point NAME=CALLS:FID,...]
        [--reuse_teacher] [--json benchmarks/results/fid_vs_calls.json] [--out benchmarks/results/fid_vs_calls.png]

The teacher's curves go into --json; --reuse_teacher reads them back from there (same model, --num and solvers'
spacings) instead of sampling again, so students can be added to the plot at the cost of their own points.

--smoke: a random tiny digits model as teacher (DDIM and PLMS) and as a student, 20 samples (DDIM's S = 2
program is then digits_quality's and finetune_quality's smoke's), 2 and 3 calls (PLMS has no 2-call S: skipped;
the student: 2), written into a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # benchmarks/: _machine, digits_quality

import ddim_jax as dj  # noqa: E402
from _machine import git_revision, random_model, sampling_batch, scratch_dir, tiny_unet  # noqa: E402
from digits_quality import held_out_fid  # noqa: E402
from solver_calls import steps_for  # noqa: E402

from ddim_jax import experiments as ex  # noqa: E402
from ddim_jax.loading import load_model  # noqa: E402
from ddim_jax.solvers import DEFAULT_SPACING  # noqa: E402

NAMES = {"ddim": "DDIM", "dpmpp_2m": "DPM-Solver++ 2M", "dpmpp_3m": "DPM-Solver++ 3M",
         "dpmpp_2m_sde": "DPM-Solver++ 2M SDE", "unipc": "UniPC", "plms": "PLMS"}


def _student(text: str) -> tuple[str, str, list[int] | None]:
    name, sep, rest = text.partition("=")
    path, _, steps = rest.partition("@")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--student must be NAME=DIR or NAME=DIR@S,...; got {text!r}")
    try:
        counts = [int(s) for s in steps.split(",")] if steps else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"--student's steps after @ must be integers; got {steps!r}") from None
    if counts is not None and min(counts) < 1:
        raise argparse.ArgumentTypeError(f"--student's steps must be >= 1; got {steps!r}")
    return name, path, counts


def _point(text: str) -> tuple[str, list[tuple[int, float]]]:
    name, sep, rest = text.partition("=")
    try:
        pts = [(int(c), float(f)) for c, f in (p.split(":") for p in rest.split(","))]
    except ValueError:
        pts = None
    if not sep or not name or not pts:
        raise argparse.ArgumentTypeError(f"--point must be NAME=CALLS:FID[,CALLS:FID...]; got {text!r}")
    return name, pts


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/digits", help="the teacher (a workdir or a model directory)")
    p.add_argument("--num", type=int, default=1000, help="samples per point")
    p.add_argument("--calls", default="1,2,3,4,5,7,10,15,20,30,50", help="the teacher's model-call budgets")
    p.add_argument("--solvers", default="ddim,dpmpp_2m,unipc,plms")
    p.add_argument("--student", action="append", type=_student, default=[], help="NAME=DIR[@S,...], repeatable")
    p.add_argument("--point", action="append", type=_point, default=[], help="NAME=CALLS:FID,..., repeatable")
    p.add_argument("--reuse_teacher", action="store_true", help="the teacher's curves from --json, not sampled")
    p.add_argument("--json", default="benchmarks/results/fid_vs_calls.json")
    p.add_argument("--out", default="benchmarks/results/fid_vs_calls.png")
    p.add_argument("--smoke", action="store_true", help="random tiny models, 20 samples: a quick test")
    args = p.parse_args(argv)
    bad = [s for s in args.solvers.split(",") if s not in dj.SOLVERS]
    if bad:
        p.error(f"--solvers must be a comma-separated list of {dj.SOLVERS}; got {args.solvers!r}")
    try:
        calls = [int(c) for c in args.calls.split(",")]
    except ValueError:
        calls = []
    if not calls or min(calls) < 1:
        p.error(f"--calls must be a comma-separated list of integers >= 1; got {args.calls!r}")
    if args.num < 2:
        p.error("--num must be at least 2 (the FID needs the covariance of at least two samples)")
    if args.smoke:
        args.num, args.calls, args.solvers = 20, "2,3", "ddim,plms"
    return args


def measure(model, score, num: int, steps: int, **kw) -> tuple[float, float]:
    t0 = time.perf_counter()
    imgs = ex.generate(model, num, sampling_batch(model, num, 250), steps, seed=0, progress=False, **kw)
    return score(imgs), time.perf_counter() - t0


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        tmp = scratch_dir()
        args.json, args.out = os.path.join(tmp, "fid_vs_calls.json"), os.path.join(tmp, "fid_vs_calls.png")
        args.workdir = random_model("digits", tiny_unet)
        args.student = [("student", args.workdir, [2])]
    score, floor = held_out_fid()
    path = pathlib.Path(args.json)
    saved = json.loads(path.read_text()) if path.exists() else {}
    solvers, calls = args.solvers.split(","), [int(c) for c in args.calls.split(",")]
    teacher = load_model(args.workdir)
    key = {"model": str(teacher.source), "num": args.num}
    curves = {}
    for solver in solvers:
        old = saved.get("teacher", {}).get(solver)
        if args.reuse_teacher and old and old["key"] == key and old["spacing"] == DEFAULT_SPACING[solver]:
            curves[solver] = old
            continue
        pts = []
        for N in calls:
            S = steps_for(solver, N)
            if S is None:
                continue
            fid, sec = measure(teacher, score, args.num, S, solver=solver)
            pts.append({"calls": N, "steps": S, "fid": fid, "seconds": sec})
            print(f"{solver} N={N}: FID {fid:.2f} ({sec:.0f} s)", file=sys.stderr, flush=True)
        curves[solver] = {"key": key, "spacing": DEFAULT_SPACING[solver], "points": pts}
    students = {}
    for name, sdir, counts in args.student:
        model = load_model(sdir)
        distilled = getattr(model.spec, "distilled", None)
        if counts is None:
            if not distilled:
                raise SystemExit(f"--student {name}: {sdir} records no step count (not a distilled model); "
                                 "give them as NAME=DIR@S,...")
            counts = [int(distilled["steps"])]
        pts = []
        for S in counts:
            fid, sec = measure(model, score, args.num, S)
            pts.append({"calls": S, "steps": S, "fid": fid, "seconds": sec})
            print(f"student {name} S={S}: FID {fid:.2f} ({sec:.0f} s)", file=sys.stderr, flush=True)
        # One NAME given several times (a progressive student's rounds, each its own directory) is one curve.
        entry = students.setdefault(name, {"models": [], "num": args.num, "points": []})
        entry["models"].append(str(model.source))
        entry["points"] = sorted(entry["points"] + pts, key=lambda p: p["calls"])
    for name, pts in args.point:
        students[name] = {"model": "given", "points": [{"calls": c, "fid": f} for c, f in pts]}
    result = {"teacher": curves, "students": students, "floor": floor, "revision": git_revision(),
              "load": f"{os.getloadavg()[0]:.1f}"}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    plot(result, str(teacher.source), args.num, args.out)
    print(table(result))
    print(f"wrote {args.out} and {path}", file=sys.stderr)


def table(result: dict) -> str:
    calls = sorted({p["calls"] for c in [*result["teacher"].values(), *result["students"].values()]
                    for p in c["points"]})
    L = ["| sampler | " + " | ".join(map(str, calls)) + " |", "|---|" + "---|" * len(calls)]
    rows = [(f"{NAMES.get(s, s)} ({c['spacing']})", c) for s, c in result["teacher"].items()]
    for name, c in [*rows, *result["students"].items()]:
        val = {p["calls"]: p["fid"] for p in c["points"]}
        L.append(f"| {name} | " + " | ".join(f"{val[n]:.2f}" if n in val else "" for n in calls) + " |")
    return "\n".join(L)


def plot(result: dict, source: str, num: int, out: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, (solver, c) in enumerate(result["teacher"].items()):  # markers and dashes tell overlapping curves apart
        pts = [(p["calls"], p["fid"]) for p in c["points"]]
        ax.plot(*zip(*pts), marker="osD^v<>"[i % 7], ms=4, ls=("-", "--", "-.", ":")[i % 4], mfc="none",
                label=f"teacher, {NAMES.get(solver, solver)} ({c['spacing']})")
    for name, c in result["students"].items():
        pts = sorted((p["calls"], p["fid"]) for p in c["points"])
        ax.plot(*zip(*pts), marker="*", ms=10, ls="--", label=name)
    ax.axhline(result["floor"], color="gray", ls=":", lw=1, label="training digits (floor)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("model calls")
    ax.set_ylabel("FID (digits-CNN features, vs held-out)")
    ax.set_title(f"{os.path.basename(os.path.normpath(source))}: {num} samples per point", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
