import os
import sys

import pytest

# Tests run on the CPU; a developer's GPU is not needed and would change float results slightly.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight CPU devices in this process, for the multi-device tests (this must happen before JAX starts).
# Code that takes ``devices`` uses all eight by default; single-device tests pass ``jax.devices()[:1]``.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# The suite is dominated by compiling small programs that then run a few steps: without LLVM's
# optimisation passes XLA:CPU compiles them several times faster (the same HLO, the same semantics; only
# the machine code is less tuned), which took the suite from ~8 to ~6.5 minutes on 2 cores. Set the flag
# yourself (e.g. =2) to test with the optimised code.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ["XLA_FLAGS"] + " --xla_backend_optimization_level=0").strip()
# Two XLA:CPU settings that compile these small programs faster:
# - the elemental IR emitter instead of the MLIR fusion emitters, which took about half the compile time: the same
#   fused HLO compiles about twice as fast (the tiny UNet's train step 4.3 -> 2.4 s, the whole suite 1,040 -> 790
#   CPU-seconds) into code whose float32 results differ in the last bits;
# - the machine code generated as one LLVM module, not split into modules compiled on parallel threads: the
#   splitting costs CPU time (the tiny UNet's 8-device train step 2.4 -> 2.05 CPU-s) and the suite's workers
#   already keep the cores busy.
# An XLA flag this jaxlib does not know would abort every process, so the session's first process checks them in
# a child first (about a second); the workers and subprocesses inherit XLA_FLAGS. Set either yourself to test
# with another value.
_COMPILE_FASTER = {"xla_cpu_use_fusion_emitters": "false", "xla_cpu_parallel_codegen_split_count": "1"}
_missing = [f"--{k}={v}" for k, v in _COMPILE_FASTER.items() if k not in os.environ["XLA_FLAGS"]]
if _missing:
    import subprocess

    _flags = " ".join([os.environ["XLA_FLAGS"], *_missing])
    if subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True,
                      env=dict(os.environ, XLA_FLAGS=_flags, JAX_PLATFORMS="cpu")).returncode == 0:
        os.environ["XLA_FLAGS"] = _flags
# One thread for torch's and the BLAS libraries' OpenMP pools. The suite runs one worker process per core, so a second
# thread in each gains nothing and spins between the small ops of the parity tests, contending with the other worker:
# Inception's torch parity took 18-21 CPU-seconds with two threads and 11 with one. (XLA's own thread pool is not an
# OpenMP pool and keeps its threads.) Set OMP_NUM_THREADS yourself to test with more.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# One persistent compilation cache for the session, shared with the subprocesses the tests start
# (SIGTERM, the command line), which then load the programs this process compiled instead of
# compiling them again. Set JAX_COMPILATION_CACHE_DIR to keep one across sessions.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="ddim_jax_test_jax_cache.")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# The slowest files (their tests' summed --durations in a full run on the 2-core machine), slowest first: pytest-xdist
# gives each worker whole files in collection order (--dist loadfile --no-loadscope-reorder), so a slow file
# collected last would keep one worker busy long after the other has finished. Other files follow in their
# usual order.
SLOWEST_FILES = ("test_benchmarks.py", "test_training.py", "test_autoencoder_training.py", "test_latent.py",
                 "test_workdir.py", "test_reliability.py", "test_notebook.py", "test_lpips.py", "test_distill.py",
                 "test_finetune.py", "test_precision.py", "test_conditional.py", "test_fsdp.py", "test_unet.py",
                 "test_experiments.py", "test_pipelines.py", "test_concat.py", "test_convert.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept


def _session_dir(tmp_path_factory):
    """The session's own temporary directory, which pytest-xdist's workers share (each has its own below it)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


@pytest.fixture(autouse=True)
def _torch_threads():
    """Puts torch's thread count back to OMP_NUM_THREADS after a test or benchmark that set its own."""
    yield
    torch, threads = sys.modules.get("torch"), os.environ["OMP_NUM_THREADS"].split(",")[0]
    if torch is not None and threads.isdigit() and torch.get_num_threads() != int(threads):
        torch.set_num_threads(int(threads))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """``tiny_run(dest=None, **training)``: the workdir of configs/tiny.py trained with these training fields
    (helpers.train: on the 8 devices), trained once per session by the first test that asks for those fields
    (pytest-xdist's workers share it). Without ``dest`` it is the shared workdir, which its users only read;
    with ``dest`` a copy of it there (``dest`` new or empty), for a test that resumes, damages or changes it."""
    import shutil

    import filelock

    root = _session_dir(tmp_path_factory)

    def tiny_run(dest=None, **training):
        name = "tiny_run" + "".join(f"-{k}={v}" for k, v in sorted(training.items()))
        path = root / name
        with filelock.FileLock(str(root / f"{name}.lock")):
            if not (root / f"{name}.done").exists():
                from helpers import train

                shutil.rmtree(path, ignore_errors=True)  # left by a worker that stopped half-way
                train(path, **training)
                (root / f"{name}.done").write_text("")
        if dest is None:
            return str(path)
        shutil.copytree(path, dest, dirs_exist_ok=True)
        return dest

    return tiny_run


@pytest.fixture
def tiny_workdir(tiny_run):
    """configs/tiny.py trained for 2 steps, its checkpoint and export at step 2: shared, only to be read."""
    return tiny_run(num_steps=2, checkpoint_every=2)


@pytest.fixture(scope="session")
def digits_cnn_cache(tmp_path_factory):
    """A function that fills a cache directory with the trained digits CNN: trained once per session (the
    first caller trains and caches it, as ``load_digits_classifier`` does; pytest-xdist's workers share it)
    and copied, so each test's cache holds only what it wrote itself besides the CNN's weights."""
    import filelock

    root = _session_dir(tmp_path_factory)
    shared = root / "digits_cnn_cache"
    with filelock.FileLock(str(root / "digits_cnn_cache.lock")):
        if not any(shared.glob("*.npz")):
            from ddim_jax import digits_classifier

            mp = pytest.MonkeyPatch()
            mp.setenv("DDIM_JAX_CACHE", str(shared))
            try:
                digits_classifier.load_digits_classifier(verbose=False)
            finally:
                mp.undo()

    def fill(cache_dir):
        import shutil

        os.makedirs(cache_dir, exist_ok=True)
        for path in shared.glob("*.npz"):
            shutil.copy(path, cache_dir)
        return cache_dir

    return fill
