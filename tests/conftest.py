import os

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
