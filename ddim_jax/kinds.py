"""The model kinds: one entry per kind of network, holding everything the rest of the project knows
about it.

A :class:`ModelKind` says which Flax module the kind builds and which of the module's fields the
model spec fills in (channels, labels); the other fields of the module's dataclass are the kind's
architecture fields (``spec.arch``, a config's ``model`` block), with the module's defaults. It also
holds the defaults of a new training config, the checks of the architecture fields (run on configs
and on ``spec.json`` files alike), the example inputs that create parameters, what the kind is
(``objective``: a diffusion model or an autoencoder, the two that training optimises, a name in
:data:`ddim_jax.training.objectives.OBJECTIVES`; or a text encoder, converted and used, not trained here),
what a diffusion model's ``y`` is (``conditioning``), for autoencoders how its latents are read and for text
encoders how their outputs are.

Adding a kind is one module (the network) and one :func:`register` call; config.py, the model spec,
training and sampling ask this registry and hold no list of kinds.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax.numpy as jnp

from ddim_jax.autoencoder import AutoencoderKL, AutoencoderVQ
from ddim_jax.clip_text import ACTIVATIONS, CLIPTextModel
from ddim_jax.cond_unet import ClassConditionedUNet, UNet2DCondition
from ddim_jax.unet import UNet

# Module fields no spec or config sets: the compute dtype and remat are arguments of ModelSpec.build.
_BUILD_FIELDS = ("dtype", "remat", "parent", "name")
OBJECTIVES = ("diffusion", "autoencoder", "text_encoder")
CONDITIONINGS = ("labels", "context")


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclasses.dataclass(frozen=True)
class Latents:
    """How an autoencoder kind's latents are read (the autoencoder objective and latent diffusion use it).

    ``channels(arch)``: the latents' channels. ``encode(net, variables, x, noise)``: the latents of images
    ``x`` (a KL posterior's mean, or ``mean + std * noise`` given noise; a VQ encoder's output before
    quantisation). ``regularized(net, variables, x, noise)``: ``(z, reg, metrics)`` for training: the
    decoder's input and the regulariser (per pixel), unweighted. ``reg_weight``: the ``loss`` config field
    weighting ``reg``; ``reg_name`` names it in the run's summary. ``decode``: the module method mapping
    ``z`` to images."""

    channels: Callable[[Mapping], int]
    encode: Callable
    regularized: Callable
    reg_weight: str
    reg_name: str
    decode: str = "decode"


@dataclasses.dataclass(frozen=True)
class TextEncoding:
    """How a text-encoder kind's outputs are read (a text-conditioned model's ``spec.encode_text``).

    ``width(arch)``: the width D of its hidden states (a UNet's ``cross_attention_dim``). ``length(arch)``:
    the token ids a row holds (77 for CLIP). ``layers(arch)``: its layer count. ``vocab(arch)``: the ids it
    takes are ``0 .. vocab - 1``. ``encode(net, variables, ids, clip_skip)``: the context ``[B, L, D]`` of
    token ids ``[B, L]``, ``clip_skip`` layers before the last (0: the last hidden state)."""

    width: Callable[[Mapping], int]
    length: Callable[[Mapping], int]
    layers: Callable[[Mapping], int]
    vocab: Callable[[Mapping], int]
    encode: Callable


@dataclasses.dataclass(frozen=True)
class ModelKind:
    """One kind of network. ``from_spec``: the module fields the spec fills in, as ``name -> f(spec)``.
    ``defaults``: a new training config's model block (the embedded digits' settings; fields left out
    take the module's defaults; ``num_classes`` for diffusion kinds). ``check(arch, need)``: calls
    ``need(ok, field, what)`` for each architecture rule (``arch`` has every field, defaults filled in);
    ``train_check`` likewise for settings a model may have but a training config should not (they train
    badly).
    ``needs_labels``: a class-conditional-only kind. ``remat``: the module takes ``remat``.
    ``trainable``: train.py trains it (a kind conditioned on context arrays, or a text encoder, has no data
    to train on). A text encoder (``objective="text_encoder"``) takes no images: its spec's ``image_size`` and
    ``channels`` are None."""

    module: type
    from_spec: Mapping[str, Callable[[Any], Any]]
    example_inputs: Callable[[Any], tuple]
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    check: Callable[[Mapping, Callable], None] = lambda arch, need: None
    train_check: Callable[[Mapping, Callable], None] = lambda arch, need: None
    objective: str = "diffusion"
    conditioning: str = "labels"
    needs_labels: bool = False
    remat: bool = False
    trainable: bool = True
    latents: Latents | None = None
    text: TextEncoding | None = None

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {self.objective!r}")
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {', '.join(CONDITIONINGS)}; got {self.conditioning!r}")
        if self.conditioning == "context" and self.trainable:
            raise ValueError("a kind conditioned on context arrays is not trainable (train.py has no text data): "
                             "set trainable=False")
        if (self.objective == "autoencoder") != (self.latents is not None):
            raise ValueError("an autoencoder kind (and only one) describes its latents")
        if (self.objective == "text_encoder") != (self.text is not None):
            raise ValueError("a text-encoder kind (and only one) describes its outputs (text=TextEncoding(...))")
        if self.objective == "text_encoder" and self.trainable:
            raise ValueError("a text-encoder kind is not trainable (train.py has no text data): set trainable=False")
        unknown = sorted(set(self.defaults) - set(self.arch_fields) - {"num_classes"})
        if unknown:
            raise ValueError(f"defaults name {unknown[0]!r}, not an architecture field of {self.module.__name__}")

    @property
    def has_images(self) -> bool:
        """Whether its models take or make images (a spec's ``image_size`` and ``channels``); a text encoder's
        do not."""
        return self.objective != "text_encoder"

    def _fields(self):
        skip = set(self.from_spec) | set(_BUILD_FIELDS)
        return [f for f in dataclasses.fields(self.module) if f.init and f.name not in skip]

    @property
    def arch_fields(self) -> tuple[str, ...]:
        """The names ``spec.arch`` may hold: the module's dataclass fields the spec does not fill in."""
        return tuple(f.name for f in self._fields())

    def full_arch(self, arch: Mapping) -> dict:
        """``arch`` with the module's defaults for the fields it leaves out."""
        out = {f.name: f.default for f in self._fields() if f.default is not dataclasses.MISSING}
        out.update(arch)
        return out

    def optional_fields(self) -> dict[str, type]:
        """Architecture fields whose default is None, with their type (for a config's placeholders)."""
        types = {"int | None": int, "float | None": float}
        return {f.name: types.get(str(f.type), object) for f in self._fields() if f.default is None}

    def build(self, spec, dtype, remat: bool):
        if remat and not self.remat:
            raise ValueError(f"remat is not offered for {spec.kind} (set training.remat=False)")
        extra = {"remat": remat} if self.remat else {}
        return self.module(**{k: f(spec) for k, f in self.from_spec.items()}, **spec.arch, dtype=dtype, **extra)


KINDS: dict[str, ModelKind] = {}


def register(name: str, kind: ModelKind) -> ModelKind:
    """Adds a kind under ``name`` (refused if the name is taken)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a model kind's name must be an identifier; got {name!r}")
    if name in KINDS:
        raise ValueError(f"model kind {name!r} is already registered")
    if not isinstance(kind, ModelKind):
        raise TypeError(f"register takes a ModelKind; got {type(kind).__name__}")
    KINDS[name] = kind
    return kind


def get(name: str) -> ModelKind:
    if name not in KINDS:
        raise ValueError(f"model kind must be one of {', '.join(KINDS)}; got {name!r}")
    return KINDS[name]


def trainable() -> list[str]:
    """The kinds train.py trains."""
    return [k for k, v in KINDS.items() if v.trainable]


# ---------------------------------------------------------------------------------------------
# Shared pieces of the entries.


def image_inputs(spec) -> tuple:
    """One image of the spec's shape (an autoencoder's input)."""
    return (jnp.zeros((1, spec.image_size, spec.image_size, spec.channels), jnp.float32),)


def denoiser_inputs(spec) -> tuple:
    """``(x, t)``, and labels for a class-conditional model: a denoiser's call."""
    x = jnp.zeros((1, spec.image_size, spec.image_size, spec.input_channels), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    return (x, t) if spec.num_labels is None else (x, t, jnp.zeros((1,), jnp.int32))


def _context_inputs(spec) -> tuple:
    x, t = denoiser_inputs(spec)[:2]
    return x, t, jnp.zeros((1, 1, spec.arch.get("cross_attention_dim", 768)), jnp.float32)


def _check_groups(a: Mapping, need, widths) -> None:
    g = a["norm_groups"]
    need(_int(g) and g >= 1 and all(w % g == 0 for w in widths), "norm_groups",
         f"a positive integer dividing every level's channels ({', '.join(map(str, widths))})")


def _check_levels(a: Mapping, need) -> tuple:
    chans = a["block_out_channels"]
    need(isinstance(chans, (tuple, list)) and len(chans) >= 1 and all(_int(c) and c >= 1 for c in chans),
         "block_out_channels", "a non-empty tuple of positive integers (one per level)")
    need(_int(a["layers_per_block"]) and a["layers_per_block"] >= 1, "layers_per_block", "a positive integer")
    _check_groups(a, need, chans)
    return tuple(chans)


def _check_unet(a: Mapping, need) -> None:
    need(_int(a["ch"]) and a["ch"] >= 1, "ch", "a positive integer")
    need(isinstance(a["ch_mult"], (tuple, list)) and len(a["ch_mult"]) >= 1
         and all(_int(k) and k >= 1 for k in a["ch_mult"]), "ch_mult", "a non-empty tuple of positive integers")
    need(_int(a["num_res_blocks"]) and a["num_res_blocks"] >= 1, "num_res_blocks", "a positive integer")
    need(isinstance(a["attn_resolutions"], (tuple, list)) and all(_int(r) for r in a["attn_resolutions"]),
         "attn_resolutions", "a tuple of feature-map sides")
    need(_real(a["dropout"]) and 0 <= a["dropout"] < 1, "dropout", "a number in [0, 1)")
    _check_groups(a, need, sorted({a["ch"] * k for k in a["ch_mult"]}))


def _train_check_unet(a: Mapping, need) -> None:
    # The ResNet blocks add the timestep (and class) embedding as a per-channel shift, which GroupNorm
    # removes from a group of one channel: such a level would never see t.
    widths = sorted({a["ch"] * k for k in a["ch_mult"]})
    need(widths[0] // a["norm_groups"] >= 2, "norm_groups",
         f"at most {widths[0] // 2} (two or more channels per group at {widths[0]} channels; DDPM has 4), or the "
         "blocks cannot see the timestep")


def _check_cond_unet(a: Mapping, need) -> None:
    chans = _check_levels(a, need)
    for name in ("down_block_types", "up_block_types"):
        need(isinstance(a[name], (tuple, list)) and len(a[name]) == len(chans), name,
             f"one block type per level ({len(chans)})")
    heads = a["attention_head_dim"]
    heads = heads if isinstance(heads, (tuple, list)) else [heads] * len(chans)
    need(len(heads) == len(chans) and all(_int(h) and h >= 1 and c % h == 0 for h, c in zip(heads, chans)),
         "attention_head_dim", f"heads dividing each level's channels ({', '.join(map(str, chans))}), one value or "
         "one per level")
    for name in ("cross_attention_dim", "context_tokens"):
        if name in a:
            need(_int(a[name]) and a[name] >= 1, name, "a positive integer")


def _check_clip_text(a: Mapping, need) -> None:
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "max_position_embeddings"):
        need(_int(a[name]) and a[name] >= 1, name, "a positive integer")
    need(a["hidden_size"] % a["num_attention_heads"] == 0, "num_attention_heads",
         f"a divisor of hidden_size ({a['hidden_size']})")
    need(a["hidden_act"] in ACTIVATIONS, "hidden_act", f"one of {', '.join(ACTIVATIONS)}")
    need(_real(a["layer_norm_eps"]) and a["layer_norm_eps"] > 0, "layer_norm_eps", "a positive number")
    need(_int(a["eos_token_id"]) and 0 <= a["eos_token_id"] < a["vocab_size"], "eos_token_id",
         f"a token id in [0, {a['vocab_size']})")


def text_inputs(spec) -> tuple:
    """One row of token ids (a text encoder's input)."""
    return (jnp.zeros((1, get(spec.kind).full_arch(spec.arch)["max_position_embeddings"]), jnp.int32),)


def _check_autoencoder(a: Mapping, need) -> None:
    _check_levels(a, need)
    need(_int(a["latent_channels"]) and a["latent_channels"] >= 1, "latent_channels", "a positive integer")
    if "num_embeddings" in a:
        need(_int(a["num_embeddings"]) and a["num_embeddings"] >= 2, "num_embeddings", "an integer >= 2")
        need(a["embedding_dim"] is None or (_int(a["embedding_dim"]) and a["embedding_dim"] >= 1), "embedding_dim",
             "None (latent_channels) or a positive integer")
        need(_real(a["beta"]) and a["beta"] >= 0, "beta", "a finite number >= 0")


def _kl_encode(net, variables, x, noise):
    mean, logvar = net.apply(variables, x, method="encode")
    return mean if noise is None else mean + jnp.exp(0.5 * logvar) * noise


def kl_to_standard_normal(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, I)) per example, summed over the latent's elements."""
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.sum(kl.reshape(kl.shape[0], -1), axis=1)


def _kl_regularized(net, variables, x, noise):
    """A posterior sample and the mean KL(q(z | x) || N(0, I)) per image (summed over the latent), per pixel."""
    mean, logvar = net.apply(variables, x, method="encode")
    kl = jnp.mean(kl_to_standard_normal(mean, logvar))
    return mean + jnp.exp(0.5 * logvar) * noise, kl / math.prod(x.shape[1:]), {"kl": kl}


def _vq_encode(net, variables, x, noise):
    return net.apply(variables, x, method="encode")


def _vq_regularized(net, variables, x, noise):
    """The quantised latents and the VQ loss (codebook + beta x commitment); logs the codes in use."""
    z = net.apply(variables, x, method="encode")
    z_q, vq_loss, indices = net.apply(variables, z, method=lambda m, z: m.quantize(z))
    used = jnp.zeros(net.num_embeddings, jnp.float32).at[indices.ravel()].max(1.0)
    return z_q, vq_loss, {"vq_loss": vq_loss, "codes_used": jnp.sum(used)}


_KL = Latents(lambda a: a["latent_channels"], _kl_encode, _kl_regularized, "kl_weight", "KL")
_VQ = Latents(lambda a: a.get("embedding_dim") or a["latent_channels"], _vq_encode, _vq_regularized,
              "codebook_weight", "VQ loss", decode="decode_quantized")
_AUTOENCODER_DIGITS = dict(block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=3, norm_groups=8)
_COND_UNET_DIGITS = dict(block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=4,
                         transformer_layers_per_block=1, cross_attention_dim=64, context_tokens=1, norm_groups=8,
                         use_linear_projection=True)

# DDPM's noise-prediction UNet (ddim_jax.unet.UNet).
register("unet", ModelKind(
    UNet, {"out_ch": lambda s: s.channels, "num_classes": lambda s: s.num_labels}, denoiser_inputs,
    defaults=dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                  resamp_with_conv=True, norm_groups=32, num_classes=None),
    check=_check_unet, train_check=_train_check_unet, remat=True))
# Latent diffusion's class-conditional UNet: diffusers' UNet2DConditionModel blocks cross-attending to
# context_tokens learned tokens per class (ddim_jax.cond_unet.ClassConditionedUNet).
register("cross_attention_unet", ModelKind(
    ClassConditionedUNet, {"num_labels": lambda s: s.num_labels, "in_channels": lambda s: s.input_channels,
                           "out_channels": lambda s: s.channels}, denoiser_inputs,
    defaults=dict(_COND_UNET_DIGITS, num_classes=10), check=_check_cond_unet, needs_labels=True))
# Stable Diffusion's UNet conditioned on given context arrays (text-encoder outputs [B, M, cross_attention_dim]);
# python -m ddim_jax.convert writes it from a diffusers Stable Diffusion folder.
register("unet2d_condition", ModelKind(
    UNet2DCondition, {"in_channels": lambda s: s.input_channels, "out_channels": lambda s: s.channels,
                      "num_class_embeds": lambda s: None},  # no class embedding: SD conditions on context alone
    _context_inputs,
    check=_check_cond_unet, conditioning="context", trainable=False))
# Latent diffusion's KL autoencoder (diffusers' AutoencoderKL layout) and its VQ sibling (VQModel layout).
register("autoencoder_kl", ModelKind(
    AutoencoderKL, {"in_channels": lambda s: s.channels}, image_inputs, defaults=_AUTOENCODER_DIGITS,
    check=_check_autoencoder, objective="autoencoder", latents=_KL))
register("autoencoder_vq", ModelKind(
    AutoencoderVQ, {"in_channels": lambda s: s.channels}, image_inputs,
    defaults=dict(_AUTOENCODER_DIGITS, num_embeddings=256, embedding_dim=None, beta=0.25),
    check=_check_autoencoder, objective="autoencoder", latents=_VQ))
# CLIP's text transformer (transformers' CLIPTextModel layout), Stable Diffusion's text encoder; python -m
# ddim_jax.convert reads it from a Stable Diffusion folder's text_encoder/ into the model's spec.text_encoder.
register("clip_text", ModelKind(
    CLIPTextModel, {}, text_inputs, check=_check_clip_text, objective="text_encoder", trainable=False,
    text=TextEncoding(lambda a: a["hidden_size"], lambda a: a["max_position_embeddings"],
                      lambda a: a["num_hidden_layers"], lambda a: a["vocab_size"],
                      lambda net, variables, ids, clip_skip: net.apply(variables, ids, clip_skip, method="encode"))))
