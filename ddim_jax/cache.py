"""The on-disk cache (trained feature extractors, reference statistics, the Inception weights).

:func:`cache_dir`: ``$DDIM_JAX_CACHE``, else ``$XDG_CACHE_HOME/ddim_jax``, else ``~/.cache/ddim_jax``.
Files are written into it with :func:`ddim_jax.files.atomic_write`, so a reader (another process
sharing the cache) sees the old file or the whole new one, never half a file. A cached file that
cannot be read (truncated by a full disk, written by something else) is recomputed and replaced, with
a warning: :func:`read_cached`.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


def cache_dir() -> str:
    """Where trained extractors and reference statistics are cached (created on demand by the writers)."""
    path = os.environ.get("DDIM_JAX_CACHE")
    if not path:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(base, "ddim_jax")
    return os.path.expanduser(path)


def read_cached(path: str, read: Callable[[str], T]) -> T | None:
    """``read(path)`` of a cached file; None when there is none, or when ``read`` fails on it: then a
    one-line warning names the file, and the caller recomputes it and writes it over the broken one."""
    if not os.path.exists(path):
        return None
    try:
        return read(path)
    except Exception as e:  # noqa: BLE001 - whatever is wrong with a cached file, it is recomputed
        detail = " ".join(str(e).split())[:200]
        print(f"warning: {path}: unreadable cache file ({type(e).__name__}: {detail}); recomputing it",
              file=sys.stderr)
        return None


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache, so a second run of a command loads its compiled
    programs instead of compiling them again. ``path``: a directory, "" to leave the cache off, or None
    for ``$JAX_COMPILATION_CACHE_DIR`` if set, else ``cache_dir()/jax``. Programs that compiled in 0.5 s or
    more are kept, unless ``$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` says otherwise. Returns the
    directory used."""
    import jax

    if path is None:
        path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(cache_dir(), "jax")
    if not path:
        return None
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # JAX has read the user's threshold
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path
