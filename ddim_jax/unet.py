"""The DDPM UNet (Ho et al. 2020) used by DDIM, as a Flax Linen module in NHWC layout.

Parameter names follow the paper's official code (ermongroup/ddim ``models/diffusion.py``):
``down_{level}_block_{i}``, ``down_{level}_attn_{i}``, ``down_{level}_downsample``, ``mid_block_1``,
``mid_attn_1``, ``mid_block_2``, ``up_{level}_block_{i}``, ``up_{level}_attn_{i}``, ``up_{level}_upsample``,
``temb_dense_0``, ``temb_dense_1``, ``conv_in``, ``norm_out``, ``conv_out`` (and ``class_embed`` when
``num_classes`` is set); ``ddim_jax.convert`` relies on these names.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddim_jax import conditioning
from ddim_jax.nets import make_model_fn, run_once_options

Array = jax.Array

# Architectures of the paper's models (DDPM's). attn_resolutions are feature-map side lengths in pixels.
PRESETS: dict[str, dict[str, Any]] = {
    # CIFAR-10 32x32: 35,746,307 parameters.
    "cifar10": dict(ch=128, out_ch=3, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                    dropout=0.1, resamp_with_conv=True, norm_groups=32, num_classes=None),
    # CelebA 64x64.
    "celeba64": dict(ch=128, out_ch=3, ch_mult=(1, 2, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                     dropout=0.1, resamp_with_conv=True, norm_groups=32, num_classes=None),
    # LSUN church / bedroom 256x256.
    "lsun256": dict(ch=128, out_ch=3, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,),
                    dropout=0.0, resamp_with_conv=True, norm_groups=32, num_classes=None),
    # A small network for tests and CPU smoke runs on 8x8 to 32x32 images.
    "tiny": dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                 dropout=0.0, resamp_with_conv=True, norm_groups=8, num_classes=None),
}

# Image side length each preset was trained at.
PRESET_IMAGE_SIZE = {"cifar10": 32, "celeba64": 64, "lsun256": 256, "tiny": 16}

_NUM_GROUPS = 32
_NORM_EPS = 1e-6


def _default_init(scale: float = 1.0):
    """DDPM's initializer: fan-average uniform variance scaling (a scale of 0 means 1e-10)."""
    return nn.initializers.variance_scaling(scale if scale > 0 else 1e-10, "fan_avg", "uniform")


def timestep_embedding(t: Array, dim: int) -> Array:
    """Sinusoidal embedding of timesteps t [B] as in DDPM: [sin(t * f), cos(t * f)], f_k = 10000^(-k/(dim/2-1))."""
    if dim < 4:
        raise ValueError(f"timestep embedding dim must be >= 4, got {dim}")
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * (-math.log(10000.0) / (half - 1)))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def _group_norm(dtype, name: str, groups: int = _NUM_GROUPS) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, epsilon=_NORM_EPS, dtype=dtype, use_fast_variance=False, name=name)


def _conv3x3(features: int, dtype, name: str, scale: float = 1.0, strides: int = 1, padding: Any = 1) -> nn.Conv:
    return nn.Conv(features, (3, 3), strides=(strides, strides), padding=padding, dtype=dtype,
                   kernel_init=_default_init(scale), name=name)


def _dense(features: int, dtype, name: str, scale: float = 1.0) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, kernel_init=_default_init(scale), name=name)


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv twice, timestep embedding added after the first conv, 1x1 (NIN) shortcut."""

    out_ch: int
    dropout: float
    dtype: Any = jnp.float32
    groups: int = _NUM_GROUPS

    @nn.compact
    def __call__(self, x: Array, temb: Array, train: bool) -> Array:
        h = nn.swish(_group_norm(self.dtype, "norm1", self.groups)(x))
        h = _conv3x3(self.out_ch, self.dtype, "conv1")(h)
        # The embedding is a per-channel shift, and norm2 removes each group's mean: with one channel
        # per group (groups = channels) the network would never see t or the class.
        h = h + _dense(self.out_ch, self.dtype, "temb_proj")(nn.swish(temb))[:, None, None, :]
        h = nn.swish(_group_norm(self.dtype, "norm2", self.groups)(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = _conv3x3(self.out_ch, self.dtype, "conv2", scale=0.0)(h)
        if x.shape[-1] != self.out_ch:
            x = _dense(self.out_ch, self.dtype, "nin_shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with a residual connection."""

    dtype: Any = jnp.float32
    groups: int = _NUM_GROUPS

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, hgt, wid, c = x.shape
        h = _group_norm(self.dtype, "norm", self.groups)(x)
        q = _dense(c, self.dtype, "q")(h).reshape(b, hgt * wid, c)
        k = _dense(c, self.dtype, "k")(h).reshape(b, hgt * wid, c)
        v = _dense(c, self.dtype, "v")(h).reshape(b, hgt * wid, c)
        w = jnp.einsum("bic,bjc->bij", q, k, preferred_element_type=jnp.float32) * (c ** -0.5)
        w = jax.nn.softmax(w, axis=-1).astype(v.dtype)
        h = jnp.einsum("bij,bjc->bic", w, v).reshape(b, hgt, wid, c)
        h = _dense(c, self.dtype, "proj_out", scale=0.0)(h)
        return x + h


class Downsample(nn.Module):
    """Halve H and W: 3x3 stride-2 conv after zero padding bottom/right by one (as DDPM), or 2x2 average pooling."""

    with_conv: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.with_conv:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
            return _conv3x3(x.shape[-1], self.dtype, "conv", strides=2, padding="VALID")(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour repetition, then an optional 3x3 conv."""

    with_conv: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        if self.with_conv:
            x = _conv3x3(x.shape[-1], self.dtype, "conv")(x)
        return x


class UNet(nn.Module):
    """DDPM's noise-prediction UNet.

    ``__call__(x, t, y=None, *, train=False)``: x [B, H, W, C] (NHWC), t [B] integer timesteps in [0, T-1]
    (a scalar is broadcast), y [B] int class labels (required iff ``num_classes`` is set). Returns eps with
    x's shape except ``out_ch`` channels, in x's dtype. ``dtype`` is the compute dtype (bfloat16 for mixed
    precision); params are float32 whatever it is, and the attention softmax and GroupNorm statistics are
    computed in float32. ``remat`` recomputes each ResNet block's activations in the backward pass
    (``jax.checkpoint``) instead of storing them: less memory for one more forward of those blocks, the
    same numbers.
    Dropout is active only with ``train=True`` and then needs the ``'dropout'`` rng. Attention is applied at
    levels whose feature-map height is in ``attn_resolutions`` and always in the middle block.
    ``norm_groups``: the GroupNorm groups (DDPM: 32). Every level's channel count must be a multiple of it,
    and each group should hold several channels (DDPM: 4): the ResNet blocks add the timestep and class
    embeddings as per-channel shifts, which a group of one channel normalises away.
    """

    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    num_classes: int | None = None
    norm_groups: int = _NUM_GROUPS
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: Array, t: Array, y: Array | None = None, *, train: bool = False) -> Array:
        if x.ndim != 4:
            raise ValueError(f"x must be [B, H, W, C], got shape {x.shape}")
        batch, height = x.shape[0], x.shape[1]
        num_levels = len(self.ch_mult)
        if height % (2 ** (num_levels - 1)) or x.shape[2] % (2 ** (num_levels - 1)):
            raise ValueError(f"x height and width must be divisible by {2 ** (num_levels - 1)} "
                             f"for ch_mult={self.ch_mult}, got shape {x.shape}")
        t = jnp.broadcast_to(jnp.asarray(t), (batch,))
        dt = self.dtype
        # static_argnums counts self: (x, temb, train) are 1, 2, 3, and train selects the dropout branch.
        Block = nn.remat(ResnetBlock, static_argnums=(3,)) if self.remat else ResnetBlock  # noqa: N806

        temb = timestep_embedding(t, self.ch)
        temb = _dense(4 * self.ch, dt, "temb_dense_0")(temb)
        temb = _dense(4 * self.ch, dt, "temb_dense_1")(nn.swish(temb))
        if self.num_classes is not None:
            if y is None:
                raise ValueError(f"y (class labels) is required: the model has num_classes={self.num_classes}")
            y = jnp.broadcast_to(jnp.asarray(y), (batch,))
            temb = temb + nn.Embed(self.num_classes, 4 * self.ch, dtype=dt, name="class_embed")(y)
        elif y is not None:
            raise ValueError("y (class labels) was given but the model has num_classes=None")

        h = _conv3x3(self.ch, dt, "conv_in")(x.astype(dt))
        hs = [h]
        res = height
        for level, mult in enumerate(self.ch_mult):
            for i in range(self.num_res_blocks):
                h = Block(self.ch * mult, self.dropout, dt, self.norm_groups,
                                name=f"down_{level}_block_{i}")(hs[-1], temb, train)
                if res in self.attn_resolutions:
                    h = AttnBlock(dt, self.norm_groups, name=f"down_{level}_attn_{i}")(h)
                hs.append(h)
            if level != num_levels - 1:
                hs.append(Downsample(self.resamp_with_conv, dt, name=f"down_{level}_downsample")(hs[-1]))
                res //= 2

        h = hs[-1]
        h = Block(h.shape[-1], self.dropout, dt, self.norm_groups, name="mid_block_1")(h, temb, train)
        h = AttnBlock(dt, self.norm_groups, name="mid_attn_1")(h)
        h = Block(h.shape[-1], self.dropout, dt, self.norm_groups, name="mid_block_2")(h, temb, train)

        for level in reversed(range(num_levels)):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = Block(self.ch * self.ch_mult[level], self.dropout, dt,
                                self.norm_groups, name=f"up_{level}_block_{i}")(h, temb, train)
                if res in self.attn_resolutions:
                    h = AttnBlock(dt, self.norm_groups, name=f"up_{level}_attn_{i}")(h)
            if level != 0:
                h = Upsample(self.resamp_with_conv, dt, name=f"up_{level}_upsample")(h)
                res *= 2
        assert not hs

        h = nn.swish(_group_norm(dt, "norm_out", self.norm_groups)(h))
        h = _conv3x3(self.out_ch, dt, "conv_out", scale=0.0)(h)
        return h.astype(x.dtype)


def init_params(model: UNet, key: Array, image_size: int, channels: int = 3) -> dict:
    """Initial params of ``model`` for [1, image_size, image_size, channels] inputs (float32)."""
    return jax.jit(functools.partial(_init, model, image_size, channels),
                   compiler_options=run_once_options(jax.devices()[0].platform))(key)


def _init(model: UNet, image_size: int, channels: int, key: Array) -> dict:
    x = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    y = None if model.num_classes is None else jnp.zeros((1,), jnp.int32)
    return model.init({"params": key}, x, t, y)["params"]


def param_shapes(model: UNet, image_size: int, channels: int = 3) -> dict:
    """The params pytree of ``model`` as ``jax.ShapeDtypeStruct`` leaves, without computing anything.

    The init is traced once per (model, image_size, channels): equal models (equal fields) share the
    shapes, and each call returns its own copy of the tree."""
    try:
        hash((model, image_size, channels))
    except TypeError:  # a field that cannot be hashed: traced every time
        return _traced_param_shapes(model, image_size, channels)
    return jax.tree_util.tree_map(lambda s: s, _cached_param_shapes(model, image_size, channels))


def _traced_param_shapes(model: UNet, image_size: int, channels: int) -> dict:
    return jax.eval_shape(functools.partial(_init, model, image_size, channels), jax.random.PRNGKey(0))


_cached_param_shapes = functools.lru_cache(maxsize=64)(_traced_param_shapes)


def count_params(params: Any) -> int:
    """Total number of scalars in a params pytree (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))


def make_eps_fn(model: UNet, params: dict, y: Array | None = None) -> jax.tree_util.Partial:
    """``eps_fn(x, t) -> eps`` for the sampler; params (and y) are pytree leaves of the returned Partial.

    Two calls with equal models give equal treedefs, so a jitted function taking eps_fn as an argument
    does not retrace when only params or y change (y must keep its shape, and None stays None).
    """
    return conditioning.eps_fn(make_model_fn(model, params), conditioning.Conditioning(labels=y))
