"""Conditioning by concatenation (latent diffusion's concat mode): extra channels next to x_t.

A concat-conditioned diffusion model sees ``concatenate([x_t, c], axis=-1)``, where ``c`` is derived
from an observation of the image (a low-resolution version, a masked one). Each entry of
:data:`CONDITIONS` says how an image is observed (``observe``, for training and for demonstrations
on held-out images) and how an observation becomes the extra channels at the sample's resolution
(``condition``: a pixel model's image side, or a latent model's latent side). Adding a task adds one
entry here; the model spec, the objective and the samplers only call these two functions.

Pure functions of arrays in [-1, 1]; nothing here knows models, data or training.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp


def box_downsample(x, factor: int):
    """``[N, H, W, C]`` -> ``[N, H/f, W/f, C]``: the mean of each f x f block."""
    n, h, w, c = x.shape
    if h % factor or w % factor:
        raise ValueError(f"images of {h}x{w} do not divide into {factor}x{factor} blocks")
    return x.reshape(n, h // factor, factor, w // factor, factor, c).mean((2, 4))


def resize(x, side: int):
    """``[N, h, w, C]`` -> ``[N, side, side, C]``, bilinear (antialiased when shrinking)."""
    return jax.image.resize(x, (x.shape[0], side, side, x.shape[-1]), "linear")


def _inpaint_observe(x):
    """The image with its centre half (side/4 .. 3 side/4) blanked to 0, and the mask (1 = seen)."""
    side = x.shape[1]
    lo, hi = side // 4, side - side // 4
    rows = (jnp.arange(side) >= lo) & (jnp.arange(side) < hi)
    hole = (rows[:, None] & rows[None, :])[None, :, :, None]
    mask = jnp.broadcast_to(1.0 - hole.astype(x.dtype), x.shape[:3] + (1,))
    return jnp.concatenate([x * mask, mask], axis=-1)


def nearest_downsample(x, height: int, width: int):
    """``[N, H, W, C]`` -> ``[N, height, width, C]`` by nearest neighbour as torch's ``interpolate`` (mode
    "nearest") picks it: output pixel ``i`` takes input pixel ``floor(i * H / height)``."""
    rows = (jnp.arange(height) * x.shape[1]) // height
    cols = (jnp.arange(width) * x.shape[2]) // width
    return x[:, rows][:, :, cols]


def _sd_inpaint_observe(x):
    raise ValueError("sd_inpaint observations are the mask and the masked image's latents (they need the "
                     "autoencoder): build them with ddim_jax.pipelines.inpaint_condition")


def _sd_inpaint_condition(obs, side):
    if obs.ndim != 4 or obs.shape[1:3] != (side, side):
        raise ValueError(f"sd_inpaint observations must be [N, {side}, {side}, 1 + latent channels] (the mask and "
                         f"the masked image's latents); got {tuple(obs.shape)}")
    return obs


@dataclasses.dataclass(frozen=True)
class Condition:
    observe: Callable  # images [N, H, W, C] in [-1, 1] -> observations
    condition: Callable  # (observations, side) -> the extra channels [N, side, side, k]
    channels: Callable[[int, int], int]  # (image channels, the sample's channels) -> k
    doc: str


CONDITIONS: dict[str, Condition] = {
    "superres2x": Condition(lambda x: box_downsample(x, 2), resize, lambda c, s: c,
                            "2x super-resolution: the image box-filtered to half its side, resized back"),
    "inpaint_center": Condition(_inpaint_observe, resize, lambda c, s: c + 1,
                                "inpainting: the image with its centre half blanked, and the mask"),
    "sd_inpaint": Condition(_sd_inpaint_observe, _sd_inpaint_condition, lambda c, s: 1 + s,
                            "Stable Diffusion inpainting (diffusers' order): the mask (1 = repaint) at the latents' "
                            "size, then the scaled latents of the image with the repainted region set to 0"),
}


def get(name: str) -> Condition:
    if name not in CONDITIONS:
        raise ValueError(f"concat must be one of {sorted(CONDITIONS)}; got {name!r}")
    return CONDITIONS[name]


def with_condition(x, c):
    """``concatenate([x, c], -1)``, ``c`` repeated along the batch when ``x`` stacks copies of the batch
    (classifier-free guidance evaluates ``[x_t; x_t]``)."""
    reps = x.shape[0] // c.shape[0]
    if reps * c.shape[0] != x.shape[0]:
        raise ValueError(f"a batch of {x.shape[0]} cannot take a condition of {c.shape[0]}")
    return jnp.concatenate([x, jnp.tile(c, (reps, 1, 1, 1)).astype(x.dtype)], axis=-1)
