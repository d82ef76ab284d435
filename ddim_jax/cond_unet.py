"""The conditional UNet of latent diffusion with cross-attention (Rombach et al. 2022, Stable Diffusion),
in diffusers' ``UNet2DConditionModel`` layout so that Stable Diffusion's weights convert by renaming.

``UNet2DCondition(x [B, H, W, C], t [B], context [B, M, cross_attention_dim], class_labels=None)`` predicts
``[B, H, W, out_channels]``. Sinusoidal timestep features (``flip_sin_to_cos``, ``freq_shift``) go through
a two-layer MLP (``time_embedding``); an optional class embedding is added to it. Down levels are ResNet
blocks, each followed in a ``CrossAttnDownBlock2D`` by a spatial transformer: GroupNorm, a 1x1 conv (or
linear) ``proj_in``, transformer blocks (self-attention, cross-attention with K and V from ``context``,
a GEGLU feed-forward, each after a LayerNorm and with a residual), ``proj_out`` and a residual. Levels
but the last end in a stride-2 conv; the mid block is ResNet, transformer, ResNet; up levels take one
more ResNet block than down levels, each on the concatenation of the features and a skip connection,
and end in nearest-neighbour upsampling and a conv. ``attention_head_dim`` is, as in diffusers' Stable
Diffusion configs, the number of heads (per level or one for all).

NHWC; parameter paths follow diffusers' module names with list indices joined by ``_``
(``down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_k/kernel`` is
``down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight``; ``time_embedding/linear_1`` keeps
its name). Parameters stay float32; ``dtype`` is the compute dtype (softmax and norms in float32).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

# Stable Diffusion 1.x's UNet (1.4 and 1.5 share it): 859,520,964 parameters.
SD15 = dict(block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            layers_per_block=2, attention_head_dim=8, cross_attention_dim=768, in_channels=4, out_channels=4,
            norm_groups=32, norm_eps=1e-5, use_linear_projection=False, flip_sin_to_cos=True, freq_shift=0)


def timestep_features(t: Array, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> Array:
    """diffusers' ``get_timestep_embedding``: ``[sin(t f), cos(t f)]`` (or cos first), ``f_k = 10000^(-k /
    (dim / 2 - freq_shift))``."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def _conv(features: int, name: str, dtype, kernel: int = 3, strides: int = 1) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), (strides, strides), padding=kernel // 2, dtype=dtype, name=name)


class TimestepEmbedding(nn.Module):
    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = nn.Dense(self.dim, dtype=self.dtype, name="linear_1")(x)
        return nn.Dense(self.dim, dtype=self.dtype, name="linear_2")(nn.silu(x))


class ResnetBlock(nn.Module):
    """diffusers' ``ResnetBlock2D``: GroupNorm-SiLU-conv, plus the projected timestep embedding,
    GroupNorm-SiLU-conv, and a residual (1x1 ``conv_shortcut`` when the channels change)."""

    out_ch: int
    groups: int
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, temb: Array) -> Array:
        norm = lambda name: nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype,  # noqa: E731
                                         use_fast_variance=False, name=name)
        h = _conv(self.out_ch, "conv1", self.dtype)(nn.silu(norm("norm1")(x)))
        h = h + nn.Dense(self.out_ch, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))[:, None, None, :]
        h = _conv(self.out_ch, "conv2", self.dtype)(nn.silu(norm("norm2")(h)))
        if x.shape[-1] != self.out_ch:
            x = _conv(self.out_ch, "conv_shortcut", self.dtype, kernel=1)(x)
        return x + h


class Attention(nn.Module):
    """Multi-head attention: queries from ``x``, keys and values from ``context`` (default: ``x``);
    ``to_q/k/v`` without bias, ``to_out_0`` with."""

    heads: int
    dim_head: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array | None = None) -> Array:
        ctx = x if context is None else context.astype(self.dtype)
        inner = self.heads * self.dim_head
        split = lambda a: a.reshape(a.shape[0], a.shape[1], self.heads, self.dim_head)  # noqa: E731
        q, k, v = (split(nn.Dense(inner, use_bias=False, dtype=self.dtype, name=n)(src))
                   for n, src in (("to_q", x), ("to_k", ctx), ("to_v", ctx)))
        w = jnp.einsum("bnhd,bmhd->bhnm", q, k, preferred_element_type=jnp.float32) * self.dim_head ** -0.5
        out = jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(w, axis=-1).astype(v.dtype), v)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(out.reshape(out.shape[0], out.shape[1], inner))


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


class TransformerBlock(nn.Module):
    """diffusers' ``BasicTransformerBlock``: self-attention, cross-attention, GEGLU feed-forward, each
    after a LayerNorm and with a residual."""

    heads: int
    dim_head: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array) -> Array:
        ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)  # noqa: E731
        x = x + Attention(self.heads, self.dim_head, self.dtype, name="attn1")(ln("norm1")(x))
        x = x + Attention(self.heads, self.dim_head, self.dtype, name="attn2")(ln("norm2")(x), context)
        return x + FeedForward(self.dtype, name="ff")(ln("norm3")(x))


class SpatialTransformer(nn.Module):
    """diffusers' ``Transformer2DModel`` on a feature map: GroupNorm, ``proj_in``, transformer blocks over
    the flattened positions, ``proj_out``, residual."""

    heads: int
    layers: int
    groups: int
    linear_projection: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array) -> Array:
        b, hgt, wid, c = x.shape
        h = nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, use_fast_variance=False, name="norm")(x)
        proj = (lambda n, name: nn.Dense(n, dtype=self.dtype, name=name)) if self.linear_projection else (  # noqa: E731
            lambda n, name: _conv(n, name, self.dtype, kernel=1))
        h = proj(c, "proj_in")(h).reshape(b, hgt * wid, c)
        for i in range(self.layers):
            h = TransformerBlock(self.heads, c // self.heads, self.dtype, name=f"transformer_blocks_{i}")(h, context)
        return x + proj(c, "proj_out")(h.reshape(b, hgt, wid, c))


class Resample(nn.Module):
    """``downsamplers_0``: a stride-2 3x3 conv (padding 1); ``upsamplers_0``: nearest x2, then a 3x3 conv."""

    up: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.up:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(x.shape[-1], "conv", self.dtype, strides=1 if self.up else 2)(x)


class Level(nn.Module):
    """One down or up block: ``num_layers`` ResNet blocks (up blocks: each on the features concatenated
    with the next skip connection), each followed by a spatial transformer in a cross-attention block, then
    an optional resampler. Returns the features and the outputs a down block passes as skips."""

    out_ch: int
    num_layers: int
    cross_attention: bool
    resample: str | None  # "down", "up" or None
    heads: int
    transformer_layers: int
    groups: int
    eps: float
    linear_projection: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: Array, temb: Array, context: Array, skips: tuple = ()) -> tuple[Array, list]:
        skips, outs = list(skips), []
        for j in range(self.num_layers):
            if skips:
                h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
            h = ResnetBlock(self.out_ch, self.groups, self.eps, self.dtype, name=f"resnets_{j}")(h, temb)
            if self.cross_attention:
                h = SpatialTransformer(self.heads, self.transformer_layers, self.groups, self.linear_projection,
                                       self.dtype, name=f"attentions_{j}")(h, context)
            outs.append(h)
        if self.resample is not None:
            name = "upsamplers_0" if self.resample == "up" else "downsamplers_0"
            h = Resample(self.resample == "up", self.dtype, name=name)(h)
            outs.append(h)
        return h, outs


def _per_level(v, n: int, name: str) -> tuple:
    v = tuple(v) if isinstance(v, (tuple, list)) else (v,) * n
    if len(v) != n:
        raise ValueError(f"{name} must be one value or one per level ({n}); got {v}")
    return v


_BLOCKS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False, "CrossAttnUpBlock2D": True, "UpBlock2D": False}


class UNet2DCondition(nn.Module):
    block_out_channels: tuple = SD15["block_out_channels"]
    down_block_types: tuple = SD15["down_block_types"]
    up_block_types: tuple = SD15["up_block_types"]
    layers_per_block: int = 2
    attention_head_dim: Any = 8  # heads per level (diffusers' name), one value or one per level
    transformer_layers_per_block: Any = 1
    cross_attention_dim: int = 768
    in_channels: int = 4
    out_channels: int = 4
    norm_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    num_class_embeds: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, t: Array, context: Array, class_labels: Array | None = None) -> Array:
        chs, n, dt = tuple(self.block_out_channels), len(self.block_out_channels), self.dtype
        for name, types in (("down_block_types", self.down_block_types), ("up_block_types", self.up_block_types)):
            bad = [b for b in types if b not in _BLOCKS or ("Down" in b) != (name == "down_block_types")]
            if len(types) != n or bad:
                raise ValueError(f"{name} must name one block per level from {', '.join(_BLOCKS)}; got {types}")
        heads = _per_level(self.attention_head_dim, n, "attention_head_dim")
        layers = _per_level(self.transformer_layers_per_block, n, "transformer_layers_per_block")
        t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
        temb = TimestepEmbedding(4 * chs[0], dt, name="time_embedding")(
            timestep_features(t, chs[0], self.flip_sin_to_cos, self.freq_shift).astype(dt))
        if self.num_class_embeds is not None:
            if class_labels is None:
                raise ValueError("this UNet has a class embedding: pass class_labels")
            temb = temb + nn.Embed(self.num_class_embeds, 4 * chs[0], name="class_embedding")(class_labels).astype(dt)
        common = dict(groups=self.norm_groups, eps=self.norm_eps, linear_projection=self.use_linear_projection,
                      dtype=dt)
        h = _conv(chs[0], "conv_in", dt)(x.astype(dt))
        skips = [h]
        for i, ch in enumerate(chs):
            h, outs = Level(ch, self.layers_per_block, _BLOCKS[self.down_block_types[i]], "down" if i < n - 1 else None,
                            heads[i], layers[i], name=f"down_blocks_{i}", **common)(h, temb, context)
            skips += outs
        mid = dict(common, heads=heads[-1], transformer_layers=layers[-1])
        h = _MidBlock(name="mid_block", **mid)(h, temb, context)
        for i, ch in enumerate(reversed(chs)):
            k = self.layers_per_block + 1
            skips, mine = skips[:-k], skips[-k:]
            h, _ = Level(ch, k, _BLOCKS[self.up_block_types[i]], "up" if i < n - 1 else None, heads[n - 1 - i],
                         layers[n - 1 - i], name=f"up_blocks_{i}", **common)(h, temb, context, tuple(mine))
        h = nn.GroupNorm(self.norm_groups, epsilon=self.norm_eps, dtype=dt, use_fast_variance=False,
                         name="conv_norm_out")(h)
        return _conv(self.out_channels, "conv_out", dt)(nn.silu(h)).astype(jnp.float32)


class _MidBlock(nn.Module):
    """diffusers' ``UNetMidBlock2DCrossAttn``: ResNet, spatial transformer, ResNet."""

    heads: int
    transformer_layers: int
    groups: int
    eps: float
    linear_projection: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: Array, temb: Array, context: Array) -> Array:
        c = h.shape[-1]
        h = ResnetBlock(c, self.groups, self.eps, self.dtype, name="resnets_0")(h, temb)
        h = SpatialTransformer(self.heads, self.transformer_layers, self.groups, self.linear_projection, self.dtype,
                               name="attentions_0")(h, context)
        return ResnetBlock(c, self.groups, self.eps, self.dtype, name="resnets_1")(h, temb)


class ClassConditionedUNet(nn.Module):
    """Latent diffusion's class-conditional model: a class embedder tau_theta(y) turning each label into
    ``context_tokens`` learned tokens of ``cross_attention_dim`` values (``class_tokens``, one row per label,
    the null label included), which every spatial transformer of a :class:`UNet2DCondition` (``unet``)
    attends to. ``__call__(x, t, y, *, train=False)`` is the signature of :class:`ddim_jax.unet.UNet`
    (no dropout: ``train`` changes nothing), so the samplers and classifier-free guidance use it alike."""

    num_labels: int
    block_out_channels: tuple = (64, 128)
    down_block_types: tuple = ("CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple = ("UpBlock2D", "CrossAttnUpBlock2D")
    layers_per_block: int = 1
    attention_head_dim: Any = 4
    transformer_layers_per_block: Any = 1
    cross_attention_dim: int = 64
    norm_groups: int = 8
    use_linear_projection: bool = True
    context_tokens: int = 1
    in_channels: int = 4
    out_channels: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, t: Array, y: Array | None = None, *, train: bool = False) -> Array:
        del train
        if y is None:
            raise ValueError("a ClassConditionedUNet needs labels y")
        y = jnp.broadcast_to(jnp.asarray(y, jnp.int32), (x.shape[0],))
        m, d = self.context_tokens, self.cross_attention_dim
        context = nn.Embed(self.num_labels, m * d, name="class_tokens")(y).reshape(x.shape[0], m, d)
        return UNet2DCondition(self.block_out_channels, self.down_block_types, self.up_block_types,
                               self.layers_per_block, self.attention_head_dim, self.transformer_layers_per_block,
                               d, self.in_channels, self.out_channels, self.norm_groups,
                               use_linear_projection=self.use_linear_projection, dtype=self.dtype,
                               name="unet")(x, t, context.astype(self.dtype))
