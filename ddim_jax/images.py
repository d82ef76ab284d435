"""Converting model-space images to uint8 and writing PNG grids."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ddim_jax.files import atomic_write


def to_uint8(x) -> np.ndarray:
    """Images in [-1, 1] (any float dtype) -> uint8 [0, 255], rounding to nearest and clipping.

    Raises ValueError if any value is NaN or inf (they have no pixel value)."""
    a = np.asarray(x)
    x = np.asarray(a, dtype=np.float32)
    bad = int(np.count_nonzero(~np.isfinite(a if a.dtype.kind == "f" else x)))
    if bad:
        raise ValueError(f"{bad} of {x.size} values are not finite (NaN or inf); refusing to convert them to pixels")
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def from_uint8(x) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return np.asarray(x, dtype=np.float32) / 127.5 - 1.0


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 1) -> np.ndarray:
    """uint8 ``[N, H, W, C]`` -> one uint8 image ``[rows * (H + pad) + pad, ...]`` with a white border."""
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, C]; got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    ncol = ncol or int(np.ceil(np.sqrt(n)))
    nrow = int(np.ceil(n / ncol))
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = images[i]
    return grid


def save_grid(images: np.ndarray, path: str, ncol: int | None = None, scale: int = 1) -> str:
    """Writes ``make_grid(images)`` as a PNG, atomically (each pixel repeated ``scale`` times for small images)."""
    grid = make_grid(images, ncol)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    return atomic_write(path, lambda f: image.save(f, format="PNG"))
