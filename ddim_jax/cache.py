"""The on-disk cache (trained feature extractors, reference statistics, the Inception weights).

:func:`cache_dir`: ``$DDIM_JAX_CACHE``, else ``$XDG_CACHE_HOME/ddim_jax``, else ``~/.cache/ddim_jax``.
Files are written into it with :func:`ddim_jax.files.atomic_write`, so a reader (another process
sharing the cache) sees the old file or the whole new one, never half a file.
"""

from __future__ import annotations

import os


def cache_dir() -> str:
    """Where trained extractors and reference statistics are cached (created on demand by the writers)."""
    path = os.environ.get("DDIM_JAX_CACHE")
    if not path:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(base, "ddim_jax")
    return os.path.expanduser(path)
