"""The rule benchmarks/solver_defaults.py chooses default spacings by (the most robust spacing: lowest worst-case
ratio to the best one, distances under the noise tied), on made-up tables whose answer is worked out by hand."""

import importlib.util
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("benchmark_solver_defaults", BENCH / "solver_defaults.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _oracle(cells: dict, floor=(0.0, 0.002)) -> dict:
    """Two problems, N = 10, one solver "s"; ``cells[problem][spacing]`` = the draws' distances."""
    problems = {p: {"floor": list(floor), "cells": {f"s|{sp}|10": v for sp, v in c.items()}} for p, c in cells.items()}
    return {"problems": problems, "calls": [10], "spacings": ["a", "b", "c"], "solvers": ["s"]}


def test_the_most_robust_spacing_is_chosen_not_the_one_that_wins_most(bench):
    # noise = 2 x std(0, 0.002) = 2 x 0.001414 = 0.002828
    oracle = _oracle({"p1": {"a": [0.010], "b": [0.020], "c": [0.011]},
                      "p2": {"a": [0.100], "b": [0.020], "c": [0.030]},
                      "p3": {"a": [0.010], "b": [0.040], "c": [0.012]}})
    rob = bench.robustness(oracle, "s")
    # a: 1, 5, 1 -> worst 5; b: 2, 1, 4 -> worst 4; c: 1.1, 1.5, 1.2 -> worst 1.5
    assert rob["worst"] == pytest.approx({"a": 5.0, "b": 4.0, "c": 1.5})
    assert rob["wins"] == {"a": 2, "b": 1, "c": 0}
    assert rob["where"]["c"] == "p2 N=10"
    assert bench.choose(oracle, None) == {"s": "c"}


def test_distances_under_the_noise_tie(bench):
    # "a" is 10x better than "b" in p1, but both are under the noise (0.002828): a tie, ratio 1.
    oracle = _oracle({"p1": {"a": [0.0001, -0.0001], "b": [0.001, 0.001], "c": [0.05, 0.05]},
                      "p2": {"a": [0.020, 0.020], "b": [0.010, 0.010], "c": [0.01, 0.01]}})
    rob = bench.robustness(oracle, "s")
    assert rob["worst"] == pytest.approx({"a": 2.0, "b": 1.0, "c": 0.05 / 0.002828427})
    assert bench.choose(oracle, None) == {"s": "b"}


def test_digits_cells_join_the_worst_case_among_the_spacings_measured_there(bench):
    oracle = _oracle({"p1": {"a": [0.010], "b": [0.012], "c": [0.011]}})
    digits = {"rows": [{"solver": "s", "spacing": sp, "calls": 10, "fid": f} for sp, f in (("a", 6.0), ("b", 3.0))]}
    rob = bench.robustness(oracle, "s", digits)
    assert set(rob["worst"]) == {"a", "b"}  # "c" was not measured on the digits: not a candidate
    assert rob["worst"] == pytest.approx({"a": 2.0, "b": 1.2})
    assert rob["where"]["a"] == "digits FID N=10"
    assert bench.choose(oracle, digits) == {"s": "b"}
