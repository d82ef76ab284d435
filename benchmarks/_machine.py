"""Shared by the benchmark scripts: interleaved timing, and what they record about the checkout and the
machine they ran on."""

from __future__ import annotations

import os
import pathlib
import platform
import subprocess
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def git_revision() -> str:
    """The checkout's commit, with ``+dirty`` when tracked files differ from it."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_description() -> dict:
    d = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
         "cpus_usable": len(os.sched_getaffinity(0))}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "Thread(s) per core", "Core(s) per socket", "L3 cache", "Hypervisor vendor"):
                d[k.strip()] = v.strip()
        d["avx512f"] = " avx512f " in out.replace("\n", " ") + " "
    except (OSError, subprocess.SubprocessError):
        pass
    return d


def interleaved(fns: dict, repeats: int) -> dict:
    """``{name: [seconds, ...]}``: each round calls every function once, in turn, so background load
    hits all of them alike."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times
