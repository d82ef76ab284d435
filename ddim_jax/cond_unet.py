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

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddim_jax.blocks import (ResnetBlock2D, TimestepEmbedding, Transformer2D, conv, group_norm, resampler,
                             timestep_features)

Array = jax.Array

# Stable Diffusion 1.x's UNet (1.4 and 1.5 share it): 859,520,964 parameters.
SD15 = dict(block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            layers_per_block=2, attention_head_dim=8, cross_attention_dim=768, in_channels=4, out_channels=4,
            norm_groups=32, norm_eps=1e-5, use_linear_projection=False, flip_sin_to_cos=True, freq_shift=0)


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
            h = ResnetBlock2D(self.out_ch, self.groups, self.eps, self.dtype, name=f"resnets_{j}")(h, temb)
            if self.cross_attention:
                h = Transformer2D(self.heads, self.transformer_layers, self.groups, self.linear_projection,
                                  self.dtype, name=f"attentions_{j}")(h, context)
            outs.append(h)
        if self.resample is not None:
            h = resampler(self.resample, self.dtype)(h)
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
        h = conv(chs[0], "conv_in", dt)(x.astype(dt))
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
        h = group_norm(self.norm_groups, "conv_norm_out", dt, self.norm_eps)(h)
        return conv(self.out_channels, "conv_out", dt)(nn.silu(h)).astype(jnp.float32)


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
        h = ResnetBlock2D(c, self.groups, self.eps, self.dtype, name="resnets_0")(h, temb)
        h = Transformer2D(self.heads, self.transformer_layers, self.groups, self.linear_projection, self.dtype,
                          name="attentions_0")(h, context)
        return ResnetBlock2D(c, self.groups, self.eps, self.dtype, name="resnets_1")(h, temb)


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
