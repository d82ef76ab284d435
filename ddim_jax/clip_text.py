"""CLIP's text transformer (Radford et al. 2021), the text encoder of Stable Diffusion 1.x and 2.x, in the
layout of transformers' ``CLIPTextModel`` so that its weights convert by renaming.

``CLIPTextModel(ids [B, L])`` (``L <= max_position_embeddings``, 77 for Stable Diffusion) returns a
:class:`CLIPTextOutput`: ``last_hidden_state`` [B, L, D] (the last layer's output after
``final_layer_norm``), ``pooler_output`` [B, D] (the end token's row of it) and ``hidden_states``, the
embeddings' output and each layer's (``num_hidden_layers + 1`` arrays, as transformers'
``output_hidden_states``; no final layer norm). Token and learned position embeddings are added; each
layer is pre-LN: ``x + self_attn(layer_norm1(x))`` with a causal mask (token i attends to j <= i), then
``x + fc2(act(fc1(layer_norm2(x))))``, ``act`` from ``hidden_act``: ``quick_gelu`` (``x sigmoid(1.702 x)``,
OpenAI CLIP, SD 1.x) or ``gelu`` (exact, OpenCLIP ViT-H, SD 2.x). :meth:`CLIPTextModel.encode` is what a
Stable Diffusion UNet cross-attends to: ``final_layer_norm(hidden_states[-(clip_skip + 1)])`` (diffusers'
``clip_skip``; 0 is ``last_hidden_state``).

The pooled row follows transformers 5: with ``eos_token_id == 2`` (the configs written before
transformers fixed it, SD 1.x's and 2.x's among them) the row of the largest id (the end token has the
largest id of CLIP's vocabulary), else the first position holding ``eos_token_id`` (row 0 if none does).

Parameter paths follow transformers' module names under ``text_model`` with list indices joined by ``_``
(``encoder/layers_3/self_attn/q_proj/kernel`` is ``text_model.encoder.layers.3.self_attn.q_proj.weight``).
Parameters stay float32; ``dtype`` is the compute dtype (softmax and norms in float32).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

ACTIVATIONS = ("quick_gelu", "gelu")

# The text encoders of Stable Diffusion's diffusers folders (text_encoder/config.json).
SD15 = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=2)
# OpenCLIP ViT-H/14's text tower with its last layer dropped (24 -> 23: SD 2.x's "penultimate layer").
SD2 = dict(SD15, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
           hidden_act="gelu")


class CLIPTextOutput(NamedTuple):
    last_hidden_state: Array
    pooler_output: Array
    hidden_states: tuple


def activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: nn.gelu(x, approximate=False)
    raise ValueError(f"hidden_act must be one of {', '.join(ACTIVATIONS)}; got {name!r}")


def _dense(features: int, name: str, dtype) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, name=name)


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with ``q_proj``/``k_proj``/``v_proj``/``out_proj``, all with biases.

    Not :class:`ddim_jax.blocks.Attention`: that one names its projections diffusers' way (``to_q``,
    ``to_out_0``), has no masks and no bias on q/k/v by default; giving it CLIP's names and a causal mask would
    change the parameter trees of the UNets and autoencoders built on it."""

    heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> Array:
        b, n, d = x.shape
        dim_head = d // self.heads
        split = lambda a: a.reshape(b, n, self.heads, dim_head)  # noqa: E731
        q, k, v = (split(_dense(d, name, self.dtype)(x)) for name in ("q_proj", "k_proj", "v_proj"))
        w = jnp.einsum("bnhd,bmhd->bhnm", q, k, preferred_element_type=jnp.float32) * dim_head ** -0.5
        w = jnp.where(mask, w, jnp.finfo(jnp.float32).min)
        out = jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(w, axis=-1).astype(v.dtype), v)
        return _dense(d, "out_proj", self.dtype)(out.reshape(b, n, d))


class CLIPMLP(nn.Module):
    intermediate_size: int
    hidden_act: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = activation(self.hidden_act)(_dense(self.intermediate_size, "fc1", self.dtype)(x))
        return _dense(x.shape[-1], "fc2", self.dtype)(h)


class CLIPEncoderLayer(nn.Module):
    heads: int
    intermediate_size: int
    hidden_act: str
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> Array:
        ln = lambda name: nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name=name)  # noqa: E731
        x = x + CLIPAttention(self.heads, self.dtype, name="self_attn")(ln("layer_norm1")(x), mask)
        return x + CLIPMLP(self.intermediate_size, self.hidden_act, self.dtype, name="mlp")(ln("layer_norm2")(x))


class CLIPTextEmbeddings(nn.Module):
    vocab_size: int
    hidden_size: int
    max_position_embeddings: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids: Array) -> Array:
        tokens = nn.Embed(self.vocab_size, self.hidden_size, dtype=self.dtype, name="token_embedding")(ids)
        positions = nn.Embed(self.max_position_embeddings, self.hidden_size, dtype=self.dtype,
                             name="position_embedding")(jnp.arange(ids.shape[1]))
        return tokens + positions[None]


class CLIPEncoder(nn.Module):
    layers: int
    heads: int
    intermediate_size: int
    hidden_act: str
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> tuple:
        """Every hidden state: the input and each layer's output."""
        states = [x]
        for i in range(self.layers):
            x = CLIPEncoderLayer(self.heads, self.intermediate_size, self.hidden_act, self.eps, self.dtype,
                                 name=f"layers_{i}")(x, mask)
            states.append(x)
        return tuple(states)


class CLIPTextModel(nn.Module):
    """CLIP's text transformer; the fields are those of transformers' ``CLIPTextConfig`` (its defaults)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    dtype: Any = jnp.float32

    def setup(self):
        self.embeddings = CLIPTextEmbeddings(self.vocab_size, self.hidden_size, self.max_position_embeddings,
                                             self.dtype)
        self.encoder = CLIPEncoder(self.num_hidden_layers, self.num_attention_heads, self.intermediate_size,
                                   self.hidden_act, self.layer_norm_eps, self.dtype)
        self.final_layer_norm = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype)

    def hidden_states(self, ids: Array, attention_mask: Array | None = None) -> tuple:
        """The embeddings' output and each layer's, for token ids [B, L] (and an optional padding mask [B, L],
        1 for tokens to attend to; Stable Diffusion passes none)."""
        ids = jnp.asarray(ids, jnp.int32)
        if ids.ndim != 2 or not 1 <= ids.shape[1] <= self.max_position_embeddings:
            raise ValueError(f"ids must be [B, L] token ids with 1 <= L <= {self.max_position_embeddings}; "
                             f"got shape {ids.shape}")
        n = ids.shape[1]
        mask = jnp.tril(jnp.ones((n, n), bool))[None, None]
        if attention_mask is not None:
            mask = mask & (jnp.asarray(attention_mask) != 0)[:, None, None, :]
        return self.encoder(self.embeddings(ids), mask)

    def __call__(self, ids: Array, attention_mask: Array | None = None) -> CLIPTextOutput:
        states = self.hidden_states(ids, attention_mask)
        last = self.final_layer_norm(states[-1])
        ids = jnp.asarray(ids, jnp.int32)
        if self.eos_token_id == 2:
            end = jnp.argmax(ids, axis=-1)
        else:
            end = jnp.argmax((ids == self.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(last, end[:, None, None], axis=1)[:, 0]
        return CLIPTextOutput(last, pooled, states)

    def encode(self, ids: Array, clip_skip: int = 0, attention_mask: Array | None = None) -> Array:
        """What a Stable Diffusion UNet cross-attends to: ``final_layer_norm(hidden_states[-(clip_skip + 1)])``
        [B, L, D] (``clip_skip`` 0: ``last_hidden_state``; diffusers' ``clip_skip``)."""
        if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or not 0 <= clip_skip < self.num_hidden_layers:
            raise ValueError(f"clip_skip must be an integer in [0, {self.num_hidden_layers - 1}] (layers skipped "
                             f"from the last); got {clip_skip!r}")
        return self.final_layer_norm(self.hidden_states(ids, attention_mask)[-(clip_skip + 1)])
