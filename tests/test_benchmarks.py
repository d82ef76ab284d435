"""Every script in benchmarks/ runs at its ``--smoke`` size (the same code path on a tiny model or
problem, in this process), and every command line recorded for it in README.md and benchmarks/*.md still
parses, so a refactor that breaks a benchmark fails here."""

import importlib.util
import pathlib
import re
import shlex
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
NAMES = sorted(p.stem for p in BENCH.glob("*.py") if not p.name.startswith("_"))


def load(name: str):
    """The script as a module (benchmarks/ on sys.path, for their shared ``_machine``)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recorded_commands(name: str) -> list[list[str]]:
    """The arguments of every ``python benchmarks/<name>.py ...`` in README.md and benchmarks/*.md."""
    pattern = re.compile(rf"python benchmarks/{name}\.py([^`|\n]*)")
    texts = [p.read_text() for p in [ROOT / "README.md", *sorted(BENCH.glob("*.md"))]]
    return [shlex.split(m.group(1)) for text in texts for m in pattern.finditer(text)]


def repository_files() -> dict:
    """Where a benchmark writes by default (benchmarks/, runs/ and other top-level entries), with mtimes."""
    files = {p: p.stat().st_mtime_ns for p in BENCH.rglob("*") if "__pycache__" not in p.parts}
    return {**files, **{p: None for p in ROOT.iterdir()}}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, digits_cnn_cache):
    """One cache for the benchmarks, holding the trained digits CNN the quality benchmarks read (trained once
    per session, conftest.py)."""
    return digits_cnn_cache(tmp_path_factory.mktemp("ddim_jax_cache"))


@pytest.mark.parametrize("name", NAMES)
def test_smoke_run_writes_nothing_into_the_repository(name, monkeypatch, cache_dir):
    monkeypatch.setenv("DDIM_JAX_CACHE", str(cache_dir))
    monkeypatch.chdir(ROOT)  # where the scripts are run from: their default output paths are relative to it
    before = repository_files()
    load(name).main(["--smoke"])
    assert repository_files() == before


@pytest.mark.parametrize("name", NAMES)
def test_recorded_commands_parse(name):
    module = load(name)
    assert module.parse_args(["--smoke"]).smoke
    for argv in [[]] + recorded_commands(name):
        assert not module.parse_args(argv).smoke, argv
