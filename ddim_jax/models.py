"""One model description, one on-disk format, one loader.

A :class:`ModelSpec` says everything needed to rebuild and use a trained network: its kind and that
kind's arguments, the image size and channels, the noise schedule (in this project's names), the
prediction type and the conditioning. A latent diffusion model's spec also holds its autoencoder's spec
and the scale factor of its latents; its parameters are ``{"denoiser": ..., "autoencoder": ...}``. A
text-conditioned model may hold its text encoder's spec too (``spec.text_encoder``, its parameters under
``"text_encoder"``). A model directory holds two files, and the text encoder's tokenizer if it has one::

    spec.json            {"format": "ddim_jax.model", "version": 1, "spec": {...}}
    params.safetensors   the float32 parameters, keys joined with "/" (e.g. "down_0_block_0/conv1/kernel")
    tokenizer/           optional: the text encoder's tokenizer (:class:`ddim_jax.tokenizer.CLIPTokenizer`'s
                         files), read back by :func:`load_tokenizer`

Training runs export their EMA parameters in this format (``workdir/model``), ``python -m
ddim_jax.convert`` writes it, and :func:`load` reads it (:func:`ddim_jax.loading.load` also reads a
training workdir or one of its checkpoints). What each kind of network is (its module, architecture fields
and checks) is the registry's, :mod:`ddim_jax.kinds`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax import concat as concat_lib
from ddim_jax import conditioning, files, kinds
from ddim_jax import tokenizer as tokenizer_lib
from ddim_jax.conditioning import Conditioning, check_labels
from ddim_jax.diffusion import PREDICTION_TYPES, predict_x0_eps
from ddim_jax.distillation import METHODS as DISTILL_METHODS
from ddim_jax.distillation import consistency_output
from ddim_jax.guidance import guided_by
from ddim_jax.nets import COMPUTE_DTYPES, compute_dtype, make_model_fn, run_once_options  # noqa: F401
from ddim_jax.schedules import SPACINGS, Schedule, make_schedule

FORMAT = "ddim_jax.model"
FORMAT_VERSION = 1
SPEC_FILE = "spec.json"
PARAMS_FILE = "params.safetensors"
TOKENIZER_DIR = "tokenizer"
EXPORT_DIR = "model"  # a training workdir's exported EMA model

_SHAPES: dict = {}  # param_shapes by architecture (tracing a network takes a while)
_SCHEDULE_FIELDS = ("name", "num_timesteps", "beta_start", "beta_end", "betas", "rescale_zero_terminal_snr")


def _frozen(v):
    """Lists become tuples (JSON round trips and Flax module fields need hashable values)."""
    if isinstance(v, (list, tuple)):
        return tuple(_frozen(x) for x in v)
    if isinstance(v, Mapping):
        return {k: _frozen(x) for k, x in v.items()}
    return v


def _jsonable(v):
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, np.generic):
        return v.item()
    return v


def _need(values: Mapping, prefix: str):
    """``need(ok, field, what)``: a one-line ValueError ``'<prefix><field> must be <what>; got <value>'`` unless ok."""

    def need(ok: bool, field: str, what: str) -> None:
        if not ok:
            raise ValueError(f"{prefix}{field} must be {what}; got {values.get(field, '(default)')!r}")

    return need


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild and use a model. ``info`` records provenance (where the model came
    from, the training step, the data block it was trained on); it is not part of the model and
    takes no part in comparisons.

    Conditioning: ``num_classes`` None is an unconditional model; else labels ``0 .. num_classes - 1``
    are the classes, and ``null_label`` (``num_classes``, one extra embedding row, or None) is the
    unconditional model a run trained with label dropout (``training.p_uncond``) also learned: with
    it the model can sample unconditionally and with classifier-free guidance.

    Latent diffusion: ``autoencoder`` is the spec of the autoencoder whose latents the model diffuses
    (``image_size`` and ``channels`` are then the latents', :attr:`output_shape` the images'), and
    ``scale_factor`` multiplies its latents (1 / their std on the training data; SD's VAE: 0.18215).
    :meth:`encode` and :meth:`decode` map between images and the diffusion's space.

    Conditioning by concatenation: ``concat`` names an entry of :data:`ddim_jax.concat.CONDITIONS`; the
    network then sees ``x_t`` with :meth:`condition`'s extra channels (an observation of the image: a
    low-resolution version, a masked one) at the sample's resolution, and ``eps_fn`` needs them.

    Text conditioning: a context-conditioned model may hold ``text_encoder``, the spec of the text encoder
    whose hidden states it cross-attends to (kind ``clip_text``; their width is the denoiser's
    ``cross_attention_dim``); :meth:`encode_text` maps token ids to that context. ``clip_skip`` picks the
    hidden state, as diffusers' option: ``final_layer_norm(hidden_states[-(clip_skip + 1)])``; 0, the last
    hidden state after the final layer norm, is what SD 1.x and 2.x use (SD 2.x's "penultimate layer" is
    its 23-layer text encoder's last). A text encoder's own spec has no images: ``image_size``, ``channels``
    and ``schedule`` are None."""

    kind: str
    arch: Mapping[str, Any]
    image_size: int | None  # None for a kind without images (a text encoder)
    channels: int | None
    schedule: Mapping[str, Any] | None  # None for a kind that is not a diffusion model (an autoencoder)
    prediction_type: str | None = "epsilon"
    num_classes: int | None = None
    null_label: int | None = None
    autoencoder: "ModelSpec | None" = None  # a latent diffusion model's (frozen) autoencoder
    scale_factor: float | None = None  # latents = scale_factor x the autoencoder's; None: not estimated yet
    concat: str | None = None  # conditioning by concatenation (ddim_jax.concat.CONDITIONS), or None
    text_encoder: "ModelSpec | None" = None  # a text-conditioned model's (frozen) text encoder
    clip_skip: int = 0  # the text encoder's hidden state the denoiser reads: layers skipped from the last
    distilled: Mapping[str, Any] | None = None  # a distilled student's sampling (see _check_distilled), or None
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self):
        entry = kinds.get(self.kind)
        if not isinstance(self.arch, Mapping):
            raise ValueError(f"arch must be a mapping of {self.kind} arguments; got {self.arch!r}")
        unknown = sorted(set(self.arch) - set(entry.arch_fields))
        if unknown:
            raise ValueError(f"unknown {self.kind} argument {unknown[0]!r}; allowed: {', '.join(entry.arch_fields)}")
        if not isinstance(self.info, Mapping):
            raise ValueError(f"info must be a mapping (the model's provenance); got {self.info!r}")
        for name in ("image_size", "channels"):
            v = getattr(self, name)
            if not entry.has_images:
                if v is not None:
                    raise ValueError(f"a {self.kind} model takes no images: its {name} must be None; got {v!r}")
            elif not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer; got {v!r}")
        if not self.is_diffusion:
            if self.schedule is not None or self.prediction_type is not None or self.num_classes is not None:
                raise ValueError(f"a {self.kind} model is not a diffusion model: its schedule, prediction_type and "
                                 f"num_classes must be None; got {self.schedule!r}, {self.prediction_type!r}, "
                                 f"{self.num_classes!r}")
        elif self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}; "
                             f"got {self.prediction_type!r}")
        if self.num_classes is not None and (not isinstance(self.num_classes, (int, np.integer))
                                             or isinstance(self.num_classes, bool) or self.num_classes < 1):
            raise ValueError(f"num_classes must be None (unconditional) or a positive integer; "
                             f"got {self.num_classes!r}")
        if self.null_label is not None and (self.num_classes is None or self.null_label != self.num_classes):
            raise ValueError(f"null_label must be None or num_classes ({self.num_classes}), the extra label of "
                             f"the unconditional model; got {self.null_label!r}")
        object.__setattr__(self, "arch", _frozen(dict(self.arch)))
        full = entry.full_arch(self.arch)
        entry.check(full, _need(full, f"{self.kind} argument "))
        if entry.needs_labels and self.num_classes is None:
            raise ValueError(f"a {self.kind} model is class-conditional: it needs num_classes")
        if entry.has_images:
            object.__setattr__(self, "image_size", int(self.image_size))
            object.__setattr__(self, "channels", int(self.channels))
        self._check_latent()
        self._check_text_encoder()
        self._check_distilled()
        if self.concat is not None:
            if not self.is_diffusion:
                raise ValueError(f"concat applies to diffusion models; a {self.kind} model has none")
            concat_lib.get(self.concat)
        if not self.is_diffusion:
            return
        if not isinstance(self.schedule, Mapping):
            raise ValueError(f"schedule must be a mapping with a name; got {self.schedule!r}")
        unknown = sorted(set(self.schedule) - set(_SCHEDULE_FIELDS))
        if unknown or "name" not in self.schedule:
            raise ValueError(f"schedule must have a name and only the fields {', '.join(_SCHEDULE_FIELDS)}; "
                             f"got {dict(self.schedule)!r}")
        object.__setattr__(self, "schedule", _frozen(dict(self.schedule)))
        self.make_schedule()  # a bad schedule fails here, not at sampling time

    def _check_latent(self) -> None:
        ae = self.autoencoder
        if isinstance(ae, Mapping):
            ae = ModelSpec.from_dict(ae)
            object.__setattr__(self, "autoencoder", ae)
        if ae is None:
            if self.scale_factor is not None:
                raise ValueError("scale_factor applies to latent diffusion models (with an autoencoder)")
            return
        if not isinstance(ae, ModelSpec) or kinds.get(ae.kind).latents is None or ae.autoencoder is not None:
            raise ValueError(f"autoencoder must be the spec of an autoencoder model; got "
                             f"{getattr(ae, 'kind', type(ae).__name__)!r}")
        if not self.is_diffusion:
            raise ValueError(f"a {self.kind} model cannot have an autoencoder (only diffusion models are latent)")
        if self.scale_factor is not None:
            if (not isinstance(self.scale_factor, (int, float, np.floating)) or isinstance(self.scale_factor, bool)
                    or not np.isfinite(self.scale_factor) or self.scale_factor <= 0):
                raise ValueError(f"scale_factor must be a finite number > 0; got {self.scale_factor!r}")
            object.__setattr__(self, "scale_factor", float(self.scale_factor))
        size, ch = ae.latent_shape
        if (self.image_size, self.channels) != (size, ch):
            raise ValueError(f"a latent model's image_size and channels are its autoencoder's latents' ({size}, {ch}); "
                             f"got ({self.image_size}, {self.channels})")
        object.__setattr__(self, "autoencoder", dataclasses.replace(ae, info={}))

    def _check_text_encoder(self) -> None:
        te = self.text_encoder
        if isinstance(te, Mapping):
            te = ModelSpec.from_dict(te)
            object.__setattr__(self, "text_encoder", te)
        if te is None:
            if not (isinstance(self.clip_skip, int) and self.clip_skip == 0):
                raise ValueError(f"clip_skip applies to models with a text encoder; got {self.clip_skip!r}")
            return
        text = kinds.get(te.kind).text if isinstance(te, ModelSpec) else None
        if text is None:
            raise ValueError(f"text_encoder must be the spec of a text-encoder model (kind "
                             f"{', '.join(k for k, v in kinds.KINDS.items() if v.text)}); got "
                             f"{getattr(te, 'kind', type(te).__name__)!r}")
        if not self.is_diffusion or kinds.get(self.kind).conditioning != "context":
            raise ValueError(f"a {self.kind} model cannot have a text encoder (only diffusion models conditioned on "
                             "context arrays are)")
        arch = kinds.get(te.kind).full_arch(te.arch)
        width, layers = text.width(arch), text.layers(arch)
        if width != self._context_width():
            raise ValueError(f"the text encoder's hidden states have width {width}; the {self.kind} model's "
                             f"cross_attention_dim is {self._context_width()}")
        skip = self.clip_skip
        if not isinstance(skip, (int, np.integer)) or isinstance(skip, bool) or not 0 <= skip < layers:
            raise ValueError(f"clip_skip must be an integer in [0, {layers - 1}] (text-encoder layers skipped from "
                             f"the last; 0: its last hidden state); got {skip!r}")
        object.__setattr__(self, "clip_skip", int(skip))
        object.__setattr__(self, "text_encoder", dataclasses.replace(te, info={}))

    def _check_distilled(self) -> None:
        """A distilled student (:mod:`ddim_jax.training.distill`) records how it samples by default:
        ``{"method": "progressive" | "consistency", "steps": S, "spacing": ..., "timesteps": [...]}``, plus a
        consistency model's ``sigma_data``, ``timestep_scaling``, ``t_min`` and ``network_prediction``: its
        network's own output type, which :meth:`eps_fn` turns into the consistency function
        ``f = c_skip x + c_out x0`` (:func:`ddim_jax.distillation.consistency_output`), so the spec's
        ``prediction_type`` is ``"x0"``. ``teacher`` and ``guidance`` are provenance."""
        d = self.distilled
        if d is None:
            return
        allowed = ("method", "steps", "spacing", "timesteps", "sigma_data", "timestep_scaling", "t_min",
                   "network_prediction", "teacher", "guidance")
        if not isinstance(d, Mapping) or set(d) - set(allowed) or d.get("method") not in DISTILL_METHODS:
            raise ValueError(f"distilled must be None or a mapping with a method ({', '.join(DISTILL_METHODS)}) and "
                             f"only the fields {', '.join(allowed)}; got {d!r:.200}")
        if not self.is_diffusion:
            raise ValueError(f"distilled applies to diffusion models; a {self.kind} model has none")
        need = _need(d, "distilled.")
        T = dict(self.schedule).get("num_timesteps") or len(dict(self.schedule).get("betas") or ())
        steps = d.get("steps")
        need(isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1, "steps", "a positive integer")
        need(d.get("spacing") in SPACINGS, "spacing", f"one of {', '.join(SPACINGS)}")
        if d["method"] == "consistency":
            for name in ("sigma_data", "timestep_scaling"):
                v = d.get(name)
                need(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and v > 0, name,
                     "a finite number > 0")
            t_min = d.get("t_min")
            need(isinstance(t_min, int) and not isinstance(t_min, bool) and 0 <= t_min < max(T, 1), "t_min",
                 f"an integer in [0, {T - 1}]")
            need(d.get("network_prediction") in PREDICTION_TYPES, "network_prediction",
                 f"one of {', '.join(PREDICTION_TYPES)}")
            if self.prediction_type != "x0":
                raise ValueError(f"a consistency model's prediction_type is 'x0' (its consistency function); got "
                                 f"{self.prediction_type!r}")
        object.__setattr__(self, "distilled", _frozen(dict(d)))

    @property
    def latent_shape(self) -> tuple[int, int]:
        """An autoencoder's latents: ``(side, channels)``."""
        self._require_autoencoder()
        a = self.arch
        ch = kinds.get(self.kind).latents.channels(a)
        f = 2 ** (len(a["block_out_channels"]) - 1)
        if self.image_size % f:
            raise ValueError(f"the autoencoder's image_size {self.image_size} is not a multiple of its factor {f}")
        return self.image_size // f, ch

    def _require_autoencoder(self) -> None:
        if kinds.get(self.kind).latents is None:
            raise ValueError(f"a {self.kind} model has no latents (it is not an autoencoder)")

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """The images the model generates ``(H, W, C)``: its own shape, or its autoencoder's images."""
        src = self.autoencoder or self
        return (src.image_size, src.image_size, src.channels)

    @property
    def input_channels(self) -> int:
        """The network's input channels: the sample's, and a concat-conditioned model's extra ones."""
        if self.concat is None:
            return self.channels
        return self.channels + concat_lib.get(self.concat).channels(self.output_shape[2], self.channels)

    def observe(self, images):
        """What a concat-conditioned model is given of images ``[N, H, W, C]`` in [-1, 1] (e.g. their
        low-resolution version); see :mod:`ddim_jax.concat`."""
        return concat_lib.get(self._require_concat()).observe(images)

    def condition(self, observations):
        """Observations (:meth:`observe`) -> the extra channels at the sample's resolution."""
        return concat_lib.get(self._require_concat()).condition(observations, self.image_size)

    def _require_concat(self) -> str:
        if self.concat is None:
            raise ValueError("this model is not conditioned by concatenation (spec.concat is None)")
        return self.concat

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """What the sampler draws and denoises: the images, or a latent model's latents."""
        return (self.image_size, self.image_size, self.channels)

    # -- using it

    def build(self, dtype: str = "float32", remat: bool = False):
        """The network (a Flax module) computing in ``dtype`` (see :data:`COMPUTE_DTYPES`), optionally
        rematerialising activations in the backward pass. Neither changes the parameters."""
        return kinds.get(self.kind).build(self, compute_dtype(dtype), bool(remat))

    @property
    def is_diffusion(self) -> bool:
        """Whether this is a diffusion model (with a schedule, sampled by the samplers)."""
        return kinds.get(self.kind).objective == "diffusion"

    @property
    def num_labels(self) -> int | None:
        """The labels the network takes: the classes and, if it has one, the null label."""
        return None if self.num_classes is None else self.num_classes + (self.null_label is not None)

    def _require_diffusion(self) -> None:
        if not self.is_diffusion:
            raise ValueError(f"this is a {self.kind} model, not a diffusion model: it has no noise schedule and "
                             "does not sample")

    def make_schedule(self) -> Schedule:
        self._require_diffusion()
        s = dict(self.schedule)
        return make_schedule(s.pop("name"), **s)

    def init(self, key) -> dict:
        """Freshly initialised parameters (traceable: call it inside a jitted function)."""
        return self.build().init(key, *kinds.get(self.kind).example_inputs(self))["params"]

    def init_params(self, key) -> dict:
        """Freshly initialised parameters, computed in one compiled program."""
        return jax.jit(self.init, compiler_options=run_once_options(jax.devices()[0].platform))(key)

    def param_shapes(self) -> dict:
        """The model's parameter tree (a latent model's: ``{"denoiser", "autoencoder"}``, and
        ``"text_encoder"`` with a text encoder) as ``jax.ShapeDtypeStruct`` leaves, computing nothing."""
        key = json.dumps(self.architecture(), sort_keys=True)
        if key not in _SHAPES:
            shapes = jax.eval_shape(self.init, jax.random.key(0))
            if self._has_components:
                shapes = {"denoiser": shapes}
                if self.autoencoder is not None:
                    shapes["autoencoder"] = self.autoencoder.param_shapes()
                if self.text_encoder is not None:
                    shapes["text_encoder"] = self.text_encoder.param_shapes()
            _SHAPES[key] = shapes
        return _SHAPES[key]

    @property
    def _has_components(self) -> bool:
        """Whether the params are ``{"denoiser", ...}`` (with an autoencoder or a text encoder)."""
        return self.autoencoder is not None or self.text_encoder is not None

    def network_params(self, params) -> dict:
        """The params of the network :meth:`build` makes (a latent or text-conditioned model's denoiser)
        from the model's."""
        return params["denoiser"] if self._has_components else params

    def _require_scale(self) -> float:
        if self.scale_factor is None:
            raise ValueError("this latent model's scale_factor has not been estimated yet (training estimates it "
                             "from the data when it starts)")
        return self.scale_factor

    def latents(self, params, x, noise=None):
        """An autoencoder's latents of images ``x`` in [-1, 1]: a KL autoencoder's posterior mean, or
        ``mean + std * noise`` given standard-normal ``noise`` of the latents' shape; a VQ autoencoder's
        latents before quantisation (as LDM's). ``params``: the autoencoder's."""
        self._require_autoencoder()
        return kinds.get(self.kind).latents.encode(self.build(), {"params": params}, x, noise)

    def encode(self, params, x, noise=None):
        """Images ``x`` in [-1, 1] -> the diffusion's space: ``x`` itself, or a latent model's autoencoder's
        :meth:`latents` times the scale factor."""
        if self.autoencoder is None:
            return x
        return self.autoencoder.latents(params["autoencoder"], x, noise) * self._require_scale()

    def decode(self, params, z):
        """The diffusion's space -> images in about [-1, 1] (a latent model decodes ``z / scale_factor``)."""
        if self.autoencoder is None:
            return z
        net = self.autoencoder.build()
        return net.apply({"params": params["autoencoder"]}, z / self._require_scale(), method="decode")

    def encode_text(self, params, ids, clip_skip: int | None = None):
        """Token ids ``[B, L]`` (a tokenizer's output; L = the text encoder's length, 77 for CLIP) -> the context
        ``[B, L, D]`` the denoiser cross-attends to (float32), through the model's text encoder
        (``params["text_encoder"]``). ``clip_skip`` (default: the spec's) picks the hidden state:
        ``final_layer_norm(hidden_states[-(clip_skip + 1)])``. Traceable (ids may be a jit argument)."""
        te = self.text_encoder
        if te is None:
            raise ValueError(f"this {self.kind} model has no text encoder (spec.text_encoder is None): give context "
                             "arrays computed elsewhere")
        entry = kinds.get(te.kind)
        arch = entry.full_arch(te.arch)
        length, vocab = entry.text.length(arch), entry.text.vocab(arch)
        if np.ndim(ids) != 2 or np.shape(ids)[1] != length:
            raise ValueError(f"ids must be token ids of shape [B, {length}] (a tokenizer's output); "
                             f"got {np.shape(ids)}")
        if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
            raise ValueError(f"ids must be integer token ids; got {jnp.result_type(ids)}")
        if not isinstance(ids, jax.core.Tracer):
            bad = np.asarray(ids)
            if bad.size and (bad.min() < 0 or bad.max() >= vocab):
                raise ValueError(f"ids must be token ids in [0, {vocab}); got values from {bad.min()} to {bad.max()}")
        skip = self.clip_skip if clip_skip is None else clip_skip
        if not isinstance(skip, (int, np.integer)) or isinstance(skip, bool) or not 0 <= skip < entry.text.layers(arch):
            raise ValueError(f"clip_skip must be an integer in [0, {entry.text.layers(arch) - 1}]; got {skip!r}")
        out = entry.text.encode(te.build(), {"params": params["text_encoder"]}, jnp.asarray(ids, jnp.int32), int(skip))
        return out.astype(jnp.float32)

    def eps_fn(self, params, y=None, guidance=None, *, rescale=0.0, dtype: str = "float32", null_context=None,
               concat=None):
        """``eps_fn(x, t)`` for the samplers (params, ``y`` and ``guidance`` are leaves, so jit caches hit).

        Unconditional models take neither ``y`` nor ``guidance``. A class-conditional model takes labels
        ``y`` (a scalar or one per example, in ``[0, num_classes)``; None = the unconditional model, which
        needs a null label) and optionally a classifier-free ``guidance`` scale (1 = no guidance, 0 = the
        unconditional model; see :mod:`ddim_jax.guidance`) with its ``rescale``. A context-conditioned model
        (kind ``unet2d_condition``) takes context arrays ``y`` (``[B, M, d]`` or one ``[M, d]`` for all) and,
        for guidance, ``null_context`` (the empty prompt's). A concat-conditioned model takes ``concat``,
        its :meth:`condition` channels ``[B, H, W, k]`` (the same for the guided and unguided halves).
        ``dtype``: the network's compute dtype (the sampler's own arithmetic stays float32).
        """
        cond = self.conditioning(y, concat)
        model_fn = make_model_fn(self.build(dtype), self.network_params(params))  # (x, t, y) -> output
        if self.is_consistency:
            model_fn = jax.tree_util.Partial(_ConsistencyApply(*self.consistency_settings()), model_fn,
                                             jnp.asarray(self.make_schedule()._alpha_bar_table))
        if guidance is None:
            return conditioning.eps_fn(model_fn, cond)
        if cond.labels is None and cond.context is None:
            raise ValueError("this model is unconditional: labels and guidance do not apply")
        if y is None:
            raise ValueError("guidance needs labels y to guide towards")
        return guided_by(model_fn, cond, self.null_conditioning(cond, null_context), guidance, rescale=rescale)

    @property
    def is_consistency(self) -> bool:
        """Whether this is a consistency model (its output is the consistency function, an x0)."""
        return self.distilled is not None and self.distilled["method"] == "consistency"

    def consistency_settings(self) -> tuple:
        """``(network_prediction, t_min, sigma_data, timestep_scaling)`` of a consistency model."""
        d = self.distilled
        return d["network_prediction"], int(d["t_min"]), float(d["sigma_data"]), float(d["timestep_scaling"])

    def conditioning(self, y=None, concat=None) -> Conditioning:
        """What the network is conditioned on, checked against the spec: class labels ``y`` (None: the null
        label), context arrays ``y`` for a context-conditioned kind, and a concat-conditioned model's
        ``concat`` channels (:meth:`condition`'s output)."""
        self._require_diffusion()
        if (concat is None) != (self.concat is None):
            raise ValueError(f"this model is conditioned by concatenation ({self.concat}): give "
                             "concat=spec.condition(observations)" if self.concat else
                             "concat applies to concat-conditioned models only")
        if concat is not None:
            want = (self.image_size, self.image_size, self.input_channels - self.channels)
            if np.ndim(concat) != 4 or tuple(np.shape(concat)[1:]) != want:
                raise ValueError(f"concat must be [B, {want[0]}, {want[1]}, {want[2]}] (spec.condition's output); "
                                 f"got {np.shape(concat)}")
            concat = jnp.asarray(concat, jnp.float32)
        if kinds.get(self.kind).conditioning == "context":
            return Conditioning(context=self.check_context(y, "y"), concat=concat)
        if self.num_classes is None:
            if y is not None:
                raise ValueError("this model is unconditional: labels and guidance do not apply")
            return Conditioning(concat=concat)
        if y is None:
            return dataclasses.replace(self.null_conditioning(Conditioning()), concat=concat)
        return Conditioning(labels=check_labels(y, self.num_classes), concat=concat)

    def null_conditioning(self, cond: Conditioning, null_context=None) -> Conditioning:
        """The unconditional model's conditioning beside ``cond`` (its concat channels): the null label, or
        ``null_context`` (the empty prompt's context) for a context-conditioned kind."""
        if kinds.get(self.kind).conditioning == "context":
            if null_context is None:
                raise ValueError("guidance needs null_context: the context of the empty prompt")
            null = self.check_context(null_context, "null_context")
            if cond.context is not None and null.shape[-2:] != cond.context.shape[-2:]:
                raise ValueError(f"context {tuple(cond.context.shape)} and null_context {tuple(null.shape)} must "
                                 "have the same [M, D]")
            return Conditioning(context=null, concat=cond.concat)
        if self.null_label is None:
            raise ValueError("this class-conditional model has no null label (it was trained without label "
                             "dropout): give labels, and no guidance")
        return Conditioning(labels=np.int32(self.null_label), concat=cond.concat)

    def _context_width(self) -> int:
        return kinds.get(self.kind).full_arch(self.arch).get("cross_attention_dim", 768)

    def check_context(self, c, name: str):
        """``c`` as float32 context arrays for this context-conditioned model (``[B, M, D]`` or ``[M, D]``,
        finite), or a one-line ValueError naming ``name``."""
        d = self._context_width()
        if c is None or np.ndim(c) not in (2, 3) or np.shape(c)[-1] != d:
            raise ValueError(f"{name} must be context arrays for this {self.kind} model, which conditions on context "
                             f"arrays (e.g. text-encoder outputs) of shape [B, M, {d}] or [M, {d}]; got "
                             f"{None if c is None else np.shape(c)} (sample it from Python: "
                             "spec.eps_fn(params, context, guidance, null_context=...))")
        c = jnp.asarray(c, jnp.float32)
        if not bool(jnp.all(jnp.isfinite(c))):
            raise ValueError(f"{name} has non-finite values")
        return c

    # -- storing it

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.concat is None:  # models without these features keep the spec.json they always had
            del d["concat"]
        if self.autoencoder is None:
            del d["autoencoder"], d["scale_factor"]
        else:
            d["autoencoder"] = {k: v for k, v in self.autoencoder.to_dict().items() if k != "info"}
        if self.distilled is None:
            del d["distilled"]
        if self.text_encoder is None:
            del d["text_encoder"], d["clip_skip"]
        else:
            d["text_encoder"] = {k: v for k, v in self.text_encoder.to_dict().items() if k != "info"}
        return _jsonable(d)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model spec field {unknown[0]!r}; allowed: {', '.join(sorted(names))}")
        missing = sorted({"kind", "arch", "image_size", "channels", "schedule"} - set(d))
        if missing:
            raise ValueError(f"model spec is missing the field {missing[0]!r}")
        return cls(**d)

    def architecture(self) -> dict:
        """What fixes the parameter shapes (to compare a checkpoint with a config before reading arrays)."""
        d = self.to_dict()
        out = {k: d[k] for k in ("kind", "arch", "image_size", "channels", "num_classes", "null_label")}
        if self.concat is not None:
            out["concat"] = self.concat
        if self.autoencoder is not None:
            out["autoencoder"] = self.autoencoder.architecture()
        if self.text_encoder is not None:
            out["text_encoder"] = self.text_encoder.architecture()
        return out


@dataclasses.dataclass(frozen=True)
class _ConsistencyApply:
    """``(model_fn, alpha_bar_table, x, t, y) -> f(x, t)``: a consistency model's network output (of type
    ``network_prediction``) as the consistency function (hashable, so jitted samplers do not retrace)."""

    network_prediction: str
    t_min: int
    sigma_data: float
    scaling: float

    def __call__(self, model_fn, table, x, t, y):
        out = model_fn(x, t, y)
        x0 = predict_x0_eps(out, x, table[t + 1], self.network_prediction)[0]
        f = consistency_output(x, x0, t, t_min=self.t_min, sigma_data=self.sigma_data, scaling=self.scaling)
        return f.astype(out.dtype)


# ---------------------------------------------------------------------------------------------
# The format.


def is_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, SPEC_FILE))


def _holds_only_a_model(path: str) -> bool:
    """A model directory with nothing else in it (its tokenizer/ aside): only such a directory is ever replaced."""
    if not is_model_dir(path) or not set(os.listdir(path)) <= {SPEC_FILE, PARAMS_FILE, TOKENIZER_DIR}:
        return False
    tok = os.path.join(path, TOKENIZER_DIR)
    return not os.path.lexists(tok) or (os.path.isdir(tok) and not os.path.islink(tok)
                                         and set(os.listdir(tok)) <= set(tokenizer_lib.FILES))


def save(path: str, spec: ModelSpec, params, *, overwrite: bool = False,
         tokenizer: tokenizer_lib.CLIPTokenizer | None = None) -> str:
    """Writes ``spec`` and ``params`` to the model directory ``path`` (atomically; returns its absolute path).

    The params must match the spec's shapes and be finite. ``tokenizer``: the text encoder's tokenizer, written
    into ``path/tokenizer/`` (a model with a text encoder only). An existing ``path`` is replaced only with
    ``overwrite``, and only if it holds a model and nothing else (or is empty): other files are never deleted.
    """
    from safetensors.numpy import save_file

    if spec.autoencoder is not None:
        spec._require_scale()
    if tokenizer is not None and spec.text_encoder is None:
        raise ValueError("tokenizer is saved with a model that has a text encoder; this spec's text_encoder is None")
    if tokenizer is not None and not isinstance(tokenizer, tokenizer_lib.CLIPTokenizer):
        raise TypeError(f"tokenizer must be a ddim_jax.tokenizer.CLIPTokenizer or None; got {type(tokenizer).__name__}")
    flat = _flatten(jax.tree.map(lambda a: np.asarray(a, np.float32), params))
    _check_params(flat, spec, os.fspath(path))
    bad = [k for k, v in flat.items() if not np.all(np.isfinite(v))]
    if bad:
        raise FloatingPointError(f"refusing to save non-finite parameters ({len(bad)} arrays, e.g. {bad[0]})")
    with files.replace_dir(os.fspath(path), overwrite=overwrite, may_replace=_holds_only_a_model) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in flat.items()}, os.path.join(tmp, PARAMS_FILE))
        files.write_json(os.path.join(tmp, SPEC_FILE),
                         {"format": FORMAT, "version": FORMAT_VERSION, "spec": spec.to_dict()})
        if tokenizer is not None:
            tokenizer.save(os.path.join(tmp, TOKENIZER_DIR))
    return os.path.abspath(os.fspath(path))


def load_tokenizer(path) -> tokenizer_lib.CLIPTokenizer:
    """The tokenizer saved in the model directory ``path`` (``path/tokenizer/``): ``tokenizer(prompts)`` gives
    the ids :meth:`ModelSpec.encode_text` takes. A directory without one is a one-line error."""
    path = os.fspath(path)
    if not is_model_dir(path):
        raise FileNotFoundError(f"{path} is not a model directory ({SPEC_FILE})")
    folder = os.path.join(path, TOKENIZER_DIR)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"the model directory {path} has no {TOKENIZER_DIR}/ (a model converted with its "
                                "text encoder and tokenizer has one)")
    return tokenizer_lib.CLIPTokenizer.from_folder(folder)


def load(path) -> tuple[ModelSpec, dict]:
    """``(spec, params)`` from a model directory (a training workdir: :func:`ddim_jax.loading.load`)."""
    path = os.fspath(path)
    if is_model_dir(path):
        return _load_dir(path)
    if os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "params")):
        raise ValueError(f"{path} is in the old converted-checkpoint layout; convert the source again with "
                         "python -m ddim_jax.convert")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    raise FileNotFoundError(f"{path} is neither a model directory ({SPEC_FILE}) nor a training workdir")


def _load_dir(path: str) -> tuple[ModelSpec, dict]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    spec_path = os.path.join(path, SPEC_FILE)
    try:
        with open(spec_path) as f:
            doc = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{spec_path} is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("spec"), dict):
        raise ValueError(f"{spec_path} is not a {FORMAT} spec file")
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"{spec_path} has format version {version!r}; this ddim_jax reads versions 1 to "
                         f"{FORMAT_VERSION} (a newer file needs a newer ddim_jax)")
    try:
        spec = ModelSpec.from_dict(doc["spec"])
        spec.param_shapes()
    except (TypeError, AttributeError) as e:  # wrong value types reach the module's constructor
        raise ValueError(f"{spec_path}: the spec cannot be built ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from None
    params_path = os.path.join(path, PARAMS_FILE)
    if not os.path.isfile(params_path):
        raise FileNotFoundError(f"{params_path} is missing")
    try:
        flat = load_file(params_path)
    except (SafetensorError, ValueError, OSError) as e:
        raise ValueError(f"cannot read {params_path} ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    _check_params(flat, spec, path)
    bad = [k for k, v in flat.items() if not np.issubdtype(v.dtype, np.floating)]
    if bad:
        raise ValueError(f"{params_path}: parameter {bad[0]} is {flat[bad[0]].dtype}; parameters are floating point")
    return spec, _unflatten({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})


def params_digest(params) -> str:
    """sha256 of a params tree's names, shapes and float32 values (equal params, equal digest, whatever
    file they were read from)."""
    h = hashlib.sha256()
    for k, v in sorted(_flatten(jax.tree.map(lambda a: np.asarray(a, np.float32), params)).items()):
        h.update(f"{k}:{v.shape};".encode())
        h.update(np.ascontiguousarray(v).tobytes())
    return h.hexdigest()


def _flatten(params) -> dict[str, np.ndarray]:
    from flax import traverse_util

    return traverse_util.flatten_dict(dict(params), sep="/")


def _unflatten(flat: Mapping[str, Any]) -> dict:
    from flax import traverse_util

    return traverse_util.unflatten_dict(dict(flat), sep="/")


def _check_params(flat: Mapping[str, Any], spec: ModelSpec, where: str) -> None:
    """The parameter names and shapes equal the spec's, or a one-line error naming the first difference."""
    want = {k: tuple(v.shape) for k, v in _flatten(spec.param_shapes()).items()}
    got = {k: tuple(np.shape(v)) for k, v in flat.items()}
    for k in sorted(set(want) | set(got)):
        if k not in got:
            raise ValueError(f"{where}: parameter {k} of the spec's {spec.kind} is missing")
        if k not in want:
            raise ValueError(f"{where}: parameter {k} is not in the spec's {spec.kind}")
        if want[k] != got[k]:
            raise ValueError(f"{where}: parameter {k} has shape {got[k]}; the spec's {spec.kind} needs {want[k]}")


