"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022), in diffusers'
``AutoencoderKL`` layout so that Stable Diffusion's VAE weights convert by renaming.

Encoder: conv_in, per level ``layers_per_block`` ResNet blocks and (except at the last level) a stride-2
downsampling, a middle block (ResNet, single-head self-attention, ResNet), GroupNorm, SiLU, conv_out to
``2 * latent_channels`` (mean and log-variance); ``quant_conv`` (1x1) on the moments. Decoder: the mirror
image from ``post_quant_conv`` (1x1) and conv_in, with ``layers_per_block + 1`` ResNet blocks per level and
nearest-neighbour upsampling followed by a 3x3 conv. NHWC throughout; parameter paths follow diffusers'
module names with list indices joined by ``_`` (``encoder/down_blocks_0/resnets_1/conv1/kernel`` is
``encoder.down_blocks.0.resnets.1.conv1.weight``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddim_jax.blocks import Attention, ResnetBlock2D, conv, group_norm, resampler

Array = jax.Array

# Stable Diffusion 1.x's VAE (f = 8, 4 latent channels): 83,653,863 parameters, latents scaled by 0.18215.
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_groups=32)
# Latent diffusion's f = 4 KL autoencoder (CompVis ``kl-f4``: ch 128, ch_mult 1, 2, 4, z = 3).
LDM_KL_F4 = dict(block_out_channels=(128, 256, 512), layers_per_block=2, latent_channels=3, norm_groups=32)
# The embedded digits' f = 4 autoencoder (configs/autoencoder_digits.py).
DIGITS_F4 = dict(block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=3, norm_groups=8)


class MidBlock(nn.Module):
    """ResNet block, single-head self-attention (diffusers' ``Attention`` with ``group_norm``), ResNet block."""

    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        x = ResnetBlock2D(c, self.groups, dtype=self.dtype, name="resnets_0")(x)
        x = Attention(1, c, qkv_bias=True, groups=self.groups, dtype=self.dtype, name="attentions_0")(x)
        return ResnetBlock2D(c, self.groups, dtype=self.dtype, name="resnets_1")(x)


class LevelBlock(nn.Module):
    """``num_layers`` ResNet blocks then an optional resampler (diffusers' Down/UpEncoderBlock2D)."""

    out_ch: int
    num_layers: int
    groups: int
    resample: str | None  # "down", "up" or None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_ch, self.groups, dtype=self.dtype, name=f"resnets_{i}")(x)
        return x if self.resample is None else resampler(self.resample, self.dtype, padding=0)(x)


class _Tower(nn.Module):
    """The fields an encoder and a decoder share."""

    block_out_channels: tuple
    layers_per_block: int
    out_channels: int
    groups: int
    dtype: Any = jnp.float32


class Encoder(_Tower):
    @nn.compact
    def __call__(self, x: Array) -> Array:
        chs = self.block_out_channels
        h = conv(chs[0], "conv_in", self.dtype)(x)
        for i, ch in enumerate(chs):
            h = LevelBlock(ch, self.layers_per_block, self.groups, "down" if i < len(chs) - 1 else None, self.dtype,
                           name=f"down_blocks_{i}")(h)
        h = MidBlock(self.groups, self.dtype, name="mid_block")(h)
        h = nn.silu(group_norm(self.groups, "conv_norm_out", self.dtype)(h))
        return conv(self.out_channels, "conv_out", self.dtype)(h)


class Decoder(_Tower):
    @nn.compact
    def __call__(self, z: Array) -> Array:
        chs = tuple(reversed(self.block_out_channels))
        h = conv(chs[0], "conv_in", self.dtype)(z)
        h = MidBlock(self.groups, self.dtype, name="mid_block")(h)
        for i, ch in enumerate(chs):
            h = LevelBlock(ch, self.layers_per_block + 1, self.groups, "up" if i < len(chs) - 1 else None, self.dtype,
                           name=f"up_blocks_{i}")(h)
        h = nn.silu(group_norm(self.groups, "conv_norm_out", self.dtype)(h))
        return conv(self.out_channels, "conv_out", self.dtype)(h)


class AutoencoderKL(nn.Module):
    """``encode(x) -> (mean, logvar)`` of the latent posterior, ``decode(z) -> x``; ``__call__(x, key=None)``
    reconstructs from the posterior's mean, or from a sample when given a ``key``. x in [-1, 1], NHWC; the
    latents have ``H / 2^(levels - 1)`` sides and ``latent_channels`` channels (unscaled: multiply by the
    model's scaling factor before diffusion)."""

    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    in_channels: int = 3
    norm_groups: int = 32
    dtype: Any = jnp.float32

    def setup(self):
        args = (self.block_out_channels, self.layers_per_block)
        self.encoder = Encoder(*args, 2 * self.latent_channels, self.norm_groups, self.dtype)
        self.decoder = Decoder(*args, self.in_channels, self.norm_groups, self.dtype)
        self.quant_conv = nn.Conv(2 * self.latent_channels, (1, 1), padding=0, dtype=self.dtype)
        self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1), padding=0, dtype=self.dtype)

    def encode(self, x: Array) -> tuple[Array, Array]:
        moments = self.quant_conv(self.encoder(x.astype(self.dtype))).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: Array) -> Array:
        return self.decoder(self.post_quant_conv(z.astype(self.dtype))).astype(jnp.float32)

    def __call__(self, x: Array, key: Array | None = None) -> Array:
        mean, logvar = self.encode(x)
        z = mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        return self.decode(z)


class VectorQuantizer(nn.Module):
    """Nearest-codebook-vector quantisation (van den Oord et al. 2017) with straight-through gradients.

    ``__call__(z) -> (z_q, loss, indices)``: ``z_q`` is ``z``'s nearest codebook vectors in the forward pass and
    passes the gradient to ``z`` unchanged; ``loss = mean((z_q - sg(z))^2) + beta * mean((sg(z_q) - z)^2)``
    (codebook term, then the commitment term). taming-transformers' and diffusers' ``legacy`` default puts
    ``beta`` on the codebook term instead. Parameter ``embedding/embedding`` is diffusers'
    ``quantize.embedding.weight``."""

    num_embeddings: int
    embedding_dim: int
    beta: float = 0.25

    @nn.compact
    def __call__(self, z: Array) -> tuple[Array, Array, Array]:
        n = self.num_embeddings
        init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -1.0 / n, 1.0 / n)  # noqa: E731
        e = nn.Embed(n, self.embedding_dim, name="embedding", embedding_init=init).embedding
        z = z.astype(jnp.float32)
        flat = z.reshape(-1, z.shape[-1])
        d = (jnp.sum(flat ** 2, axis=1, keepdims=True) - 2.0 * flat @ e.T + jnp.sum(e ** 2, axis=1)[None, :])
        indices = jnp.argmin(d, axis=1)
        z_q = e[indices].reshape(z.shape)
        sg = jax.lax.stop_gradient
        loss = jnp.mean(jnp.square(z_q - sg(z))) + self.beta * jnp.mean(jnp.square(sg(z_q) - z))
        return z + sg(z_q - z), loss, indices.reshape(z.shape[:-1])


class AutoencoderVQ(nn.Module):
    """The VQ-regularised autoencoder of latent diffusion in diffusers' ``VQModel`` layout:
    ``encode(x) -> z`` (``vq_embed_dim`` channels, the latents a diffusion model sees), ``quantize(z) ->
    (z_q, vq_loss, indices)``, ``decode(z) -> x`` (quantising first), ``__call__(x) -> x_rec``."""

    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    latent_channels: int = 3
    num_embeddings: int = 256
    embedding_dim: int | None = None  # diffusers' vq_embed_dim (None: latent_channels)
    beta: float = 0.25
    in_channels: int = 3
    norm_groups: int = 32
    dtype: Any = jnp.float32

    def setup(self):
        args = (self.block_out_channels, self.layers_per_block)
        dim = self.embedding_dim or self.latent_channels
        self.encoder = Encoder(*args, self.latent_channels, self.norm_groups, self.dtype)
        self.decoder = Decoder(*args, self.in_channels, self.norm_groups, self.dtype)
        self.quant_conv = nn.Conv(dim, (1, 1), padding=0, dtype=self.dtype)
        self.quantize = VectorQuantizer(self.num_embeddings, dim, self.beta)
        self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1), padding=0, dtype=self.dtype)

    def encode(self, x: Array) -> Array:
        return self.quant_conv(self.encoder(x.astype(self.dtype))).astype(jnp.float32)

    def decode_quantized(self, z_q: Array) -> Array:
        return self.decoder(self.post_quant_conv(z_q.astype(self.dtype))).astype(jnp.float32)

    def decode(self, z: Array) -> Array:
        return self.decode_quantized(self.quantize(z)[0])

    def __call__(self, x: Array) -> Array:
        return self.decode(self.encode(x))
