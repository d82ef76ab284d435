"""diffusers-layout building blocks, shared by the networks whose weights convert from diffusers by renaming
(:mod:`ddim_jax.cond_unet`, :mod:`ddim_jax.autoencoder`): ResNet blocks, attention, spatial transformers,
resamplers and the timestep embedding.

NHWC; each module's parameters carry diffusers' names with list indices joined by ``_`` (``to_out_0`` is
``to_out.0``). Parameters stay float32; ``dtype`` is the compute dtype (softmax and norms in float32).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def group_norm(groups: int, name: str, dtype, eps: float = 1e-6) -> nn.GroupNorm:
    return nn.GroupNorm(groups, epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def conv(features: int, name: str, dtype, kernel: int = 3, strides: int = 1, padding: int | None = None) -> nn.Conv:
    """A square conv, padded ``kernel // 2`` on every side unless ``padding`` says otherwise."""
    pad = kernel // 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), (strides, strides), padding=pad, dtype=dtype, name=name)


def timestep_features(t: Array, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> Array:
    """diffusers' ``get_timestep_embedding``: ``[sin(t f), cos(t f)]`` (or cos first), ``f_k = 10000^(-k /
    (dim / 2 - freq_shift))``."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nn.Module):
    """The MLP on the timestep features: ``linear_1``, SiLU, ``linear_2``."""

    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = nn.Dense(self.dim, dtype=self.dtype, name="linear_1")(x)
        return nn.Dense(self.dim, dtype=self.dtype, name="linear_2")(nn.silu(x))


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv, plus the projected timestep embedding (``time_emb_proj``, only when a ``temb`` is
    given), GroupNorm-SiLU-conv, and a residual (1x1 ``conv_shortcut`` when the channels change)."""

    out_ch: int
    groups: int
    eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, temb: Array | None = None) -> Array:
        h = conv(self.out_ch, "conv1", self.dtype)(nn.silu(group_norm(self.groups, "norm1", self.dtype, self.eps)(x)))
        if temb is not None:
            h = h + nn.Dense(self.out_ch, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))[:, None, None, :]
        h = conv(self.out_ch, "conv2", self.dtype)(nn.silu(group_norm(self.groups, "norm2", self.dtype, self.eps)(h)))
        if x.shape[-1] != self.out_ch:
            x = conv(self.out_ch, "conv_shortcut", self.dtype, kernel=1)(x)
        return x + h


class Attention(nn.Module):
    """Multi-head attention: queries from ``x`` [B, N, C], keys and values from ``context`` (default: ``x``);
    ``to_q/k/v`` (with a bias when ``qkv_bias``) and ``to_out_0``. With ``groups`` set (the VAE's mid-block
    self-attention), ``x`` is a feature map [B, H, W, C], normalised first (``group_norm``) and added back
    to the output."""

    heads: int
    dim_head: int
    qkv_bias: bool = False
    groups: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array | None = None) -> Array:
        h = x if self.groups is None else group_norm(self.groups, "group_norm", self.dtype)(x).reshape(
            x.shape[0], -1, x.shape[-1])
        ctx = h if context is None else context.astype(self.dtype)
        inner = self.heads * self.dim_head
        split = lambda a: a.reshape(a.shape[0], a.shape[1], self.heads, self.dim_head)  # noqa: E731
        q, k, v = (split(nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name=n)(src))
                   for n, src in (("to_q", h), ("to_k", ctx), ("to_v", ctx)))
        w = jnp.einsum("bnhd,bmhd->bhnm", q, k, preferred_element_type=jnp.float32) * self.dim_head ** -0.5
        out = jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(w, axis=-1).astype(v.dtype), v)
        out = nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(out.reshape(out.shape[0], out.shape[1], inner))
        return out if self.groups is None else x + out.reshape(x.shape)


class GEGLU(nn.Module):
    inner: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        hidden, gate = jnp.split(nn.Dense(2 * self.inner, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return hidden * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = GEGLU(4 * x.shape[-1], self.dtype, name="net_0")(x)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention, GEGLU feed-forward, each after a LayerNorm and with a residual."""

    heads: int
    dim_head: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array) -> Array:
        ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)  # noqa: E731
        x = x + Attention(self.heads, self.dim_head, dtype=self.dtype, name="attn1")(ln("norm1")(x))
        x = x + Attention(self.heads, self.dim_head, dtype=self.dtype, name="attn2")(ln("norm2")(x), context)
        return x + FeedForward(self.dtype, name="ff")(ln("norm3")(x))


class Transformer2D(nn.Module):
    """diffusers' ``Transformer2DModel`` on a feature map: GroupNorm, ``proj_in`` (a 1x1 conv, or a linear layer
    with ``linear_projection``), transformer blocks over the flattened positions, ``proj_out``, residual."""

    heads: int
    layers: int
    groups: int
    linear_projection: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array) -> Array:
        b, hgt, wid, c = x.shape
        h = group_norm(self.groups, "norm", self.dtype)(x)
        proj = (lambda name: nn.Dense(c, dtype=self.dtype, name=name)) if self.linear_projection else (  # noqa: E731
            lambda name: conv(c, name, self.dtype, kernel=1))
        h = proj("proj_in")(h).reshape(b, hgt * wid, c)
        for i in range(self.layers):
            h = BasicTransformerBlock(self.heads, c // self.heads, self.dtype, name=f"transformer_blocks_{i}")(
                h, context)
        return x + proj("proj_out")(h.reshape(b, hgt, wid, c))


class Downsample2D(nn.Module):
    """A stride-2 3x3 conv (``conv``) padded ``padding`` on every side; ``padding=0`` (the VAE's) pads the
    bottom and right by one instead."""

    padding: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(x.shape[-1], "conv", self.dtype, strides=2, padding=self.padding)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv (``conv``)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(x.shape[-1], "conv", self.dtype)(x)


def resampler(kind: str, dtype, padding: int = 1) -> nn.Module:
    """A level's resampler: ``downsamplers_0`` (:class:`Downsample2D` with ``padding``) for ``"down"``,
    ``upsamplers_0`` (:class:`Upsample2D`) for ``"up"``."""
    if kind == "down":
        return Downsample2D(padding, dtype, name="downsamplers_0")
    if kind == "up":
        return Upsample2D(dtype, name="upsamplers_0")
    raise ValueError(f"resampler kind must be 'down' or 'up'; got {kind!r}")
