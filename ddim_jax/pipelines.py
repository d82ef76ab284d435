"""Stable Diffusion's pipelines as pure functions of a model (spec and params) and arrays.

* :func:`text_to_image`: latents ``x_T`` (drawn from a seed, or given) denoised under context arrays (a text
  encoder's output for each prompt) with classifier-free guidance against ``null_context`` (the negative or
  empty prompt's), then decoded.
* :func:`image_to_image` (SDEdit, Meng et al. 2022): an image encoded, noised to the step that ``strength``
  selects and denoised from there; diffusers' rule: of the S steps of tau, ``k = min(int(S * strength), S)``
  are taken, the first at ``tau[k - 1]``.
* :func:`inpaint`: an inpainting model (``spec.concat == "sd_inpaint"``: SD's 9-channel UNets, given the mask
  and the masked image's latents, :func:`inpaint_condition`), or any other model by replacing the known
  region with the forward-noised image after every step (RePaint, :func:`ddim_jax.sampling.repaint_sample`).
* :func:`invert`, :func:`edit`, :func:`inversion_error`: DDIM inversion of an image under a prompt to x_T (the
  eta = 0 ODE run forward), regeneration from it under another prompt, and the reconstruction error as the
  step count grows.
* :func:`encode_prompts`: prompts -> ``(context, null_context)`` through a tokenizer and the model's text
  encoder (once per prompt, not per step).

Conventions: images are ``[B, H, W, C]`` in [-1, 1] (the project's), outputs are clipped to [-1, 1] (``(x +
1) / 2`` is diffusers' ``output_type="np"``); masks are ``[H, W]``, ``[B, H, W]`` or ``[B, H, W, 1]`` in [0,
1], 1 (white) = repaint, binarised at 0.5 as diffusers does. A latent model works at any ``height`` and
``width`` divisible by its autoencoder's factor times its UNet's (latents ``[B, H / f, W / f, C]``); a
pixel model's f is 1. Context arrays are ``[B, M, D]`` (one per image) or ``[M, D]`` (one for all); class
labels (a class-conditional pixel or latent model) go in ``labels``. ``guidance`` is diffusers' scale (None or
1 = the conditional model alone, one network call per step); other values need ``null_context`` (or a null
label). Pixel models' x0 predictions are clipped to [-1, 1] (the paper's); latents are not.

Sampling runs :func:`ddim_jax.solvers.sample`: any solver and spacing over ``num_steps`` (default 50), or
explicit increasing ``timesteps`` (SD folders' DDIM schedule is ``leading`` with ``steps_offset = 1``:
``timesteps = i * (T // S) + 1``). Every sampler lands on alpha-bar 1 after its last step, i.e. diffusers'
DDIMScheduler with ``set_alpha_to_one=True``; SD folders ship ``set_alpha_to_one=False``, whose last step
stops at ``alphas_cumprod[0]`` and keeps a little noise (``sqrt(1 - 0.99915) = 0.03`` of it in latent space).

Noise: ``seed`` draws everything not given: ``x_T`` from ``fold_in(key(seed), 0)``, the img2img noise from
``fold_in(key(seed), 1)``, a stochastic solver's or RePaint's per-step noise from ``fold_in(key(seed), 2)``.
The autoencoder's posterior mean encodes images unless ``encoder_noise`` (standard normal, the latents'
shape) is given: ``mean + std * encoder_noise``, diffusers' ``latent_dist.sample``.
"""

from __future__ import annotations

import json
import math
import numbers
import operator

import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax import kinds
from ddim_jax.concat import nearest_downsample
from ddim_jax.conditioning import Conditioning
from ddim_jax.conditioning import eps_fn as conditioned_eps_fn
from ddim_jax.guidance import guided_by
from ddim_jax.models import ModelSpec, make_model_fn
from ddim_jax.sampling import ddim_encode, ddim_sample, repaint_sample
from ddim_jax.schedules import make_timesteps
from ddim_jax.solvers import SOLVER_TABLE, resolve_spacing, sample

__all__ = ["edit", "encode_images", "encode_prompts", "image_to_image", "inpaint", "inpaint_condition",
           "inversion_error", "invert", "latent_size", "reconstruction_errors", "start_steps", "text_to_image"]

DEFAULT_STEPS = 50  # the step count when neither num_steps nor timesteps is given
_JITTED: dict = {}  # (what, the component's spec as JSON, ...) -> a jitted function of the component's params


def _jitted(spec: ModelSpec, what: str, clip_skip: int | None = None):
    """``fn(params, ...)``, jitted once per component (models sharing an autoencoder share its programs)."""
    part = spec.autoencoder if what in ("encode", "decode") else spec.text_encoder
    if what == "encode_text":
        clip_skip = spec.clip_skip if clip_skip is None else clip_skip
    key = (what, clip_skip, spec.scale_factor, json.dumps(part.to_dict(), sort_keys=True))
    if key not in _JITTED:
        scale = spec.scale_factor

        def encode(p, x, noise):  # the scaled latents of images x
            return part.latents(p, x, noise) * scale

        def decode(p, z):
            return part.build().apply({"params": p}, z / scale, method="decode")

        def encode_text(p, ids, s=spec):
            return s.encode_text({"text_encoder": p}, ids, clip_skip)

        _JITTED[key] = jax.jit({"encode": encode, "decode": decode, "encode_text": encode_text}[what])
    name = {"encode": "autoencoder", "decode": "autoencoder", "encode_text": "text_encoder"}[what]
    return lambda params, *args: _JITTED[key](params[name], *args)


# ---------------------------------------------------------------------------------------------
# Shapes, steps and conditioning.


def _factors(spec: ModelSpec) -> tuple[int, int]:
    """(the autoencoder's factor, the denoiser's): image sides must divide by their product."""
    f = 1 if spec.autoencoder is None else spec.autoencoder.image_size // spec.image_size
    arch = kinds.get(spec.kind).full_arch(spec.arch)
    levels = len(arch.get("block_out_channels") or arch.get("ch_mult") or (1,))
    return f, 2 ** (levels - 1)


def latent_size(spec: ModelSpec, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """The sample's ``(h, w)`` for images of ``height x width`` (default: the spec's image size), or a
    one-line ValueError naming the side that does not divide."""
    f, d = _factors(spec)
    size = spec.output_shape[0]
    out = []
    for name, v in (("height", size if height is None else height), ("width", size if width is None else width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 or v % (f * d):
            raise ValueError(f"{name} must be a positive multiple of {f * d} (the autoencoder's factor {f} times the "
                             f"denoiser's {d}); got {v!r}")
        out.append(int(v) // f)
    return out[0], out[1]


def _tau(spec: ModelSpec, num_steps, spacing, timesteps, solver) -> np.ndarray:
    """The increasing timesteps tau of a run: ``timesteps`` as given, else ``make_timesteps`` with ``num_steps``
    (default :data:`DEFAULT_STEPS`) and ``spacing`` (default: the solver's)."""
    schedule = spec.make_schedule()
    if timesteps is not None:
        if num_steps is not None:
            raise ValueError("give num_steps or timesteps, not both")
        tau = np.asarray(timesteps)
        if tau.ndim != 1 or tau.size < 1 or not np.issubdtype(tau.dtype, np.integer) or np.any(np.diff(tau) <= 0):
            raise ValueError(f"timesteps must be a non-empty increasing 1-D integer array; got {timesteps!r}")
        return tau.astype(np.int32)
    if num_steps is None:
        num_steps = DEFAULT_STEPS
    return make_timesteps(schedule.num_timesteps, num_steps, resolve_spacing(solver, spacing), schedule=schedule)


def start_steps(tau, strength: float) -> np.ndarray:
    """The timesteps an image-to-image run takes at ``strength`` in (0, 1] (diffusers' rule): of the S
    timesteps of the increasing ``tau``, the first ``k = min(int(S * strength), S)``; the image is noised to
    ``tau[k - 1]``. A one-line ValueError if ``k`` is 0."""
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 < strength <= 1:
        raise ValueError(f"strength must be a number in (0, 1] (1 = start from pure noise); got {strength!r}")
    S = len(tau)
    k = min(int(S * strength), S)
    if k < 1:
        raise ValueError(f"strength={strength} with {S} steps leaves no step (int({S} * {strength}) = 0): raise "
                         "strength or the number of steps")
    return np.asarray(tau)[:k]


def _is_context(spec: ModelSpec) -> bool:
    return kinds.get(spec.kind).conditioning == "context"


def _eps_fn(spec: ModelSpec, params, context, null_context, labels, guidance, concat, dtype, rescale):
    """The ``eps_fn(x, t)`` of the model under its conditioning (context arrays, labels or none), guided when
    ``guidance`` is not 1; ``concat``: an ``sd_inpaint`` model's extra channels."""
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, numbers.Real)
                                 or not math.isfinite(guidance)):
        raise ValueError(f"guidance must be a finite number (1 = no guidance); got {guidance!r}")
    plain = guidance is None or (guidance == 1 and rescale == 0)
    if not _is_context(spec):
        if context is not None or null_context is not None:
            raise ValueError(f"this {spec.kind} model does not condition on context arrays (it takes "
                             f"{'labels' if spec.num_classes else 'no conditioning'})")
        return spec.eps_fn(params, labels, None if plain else guidance, rescale=rescale, dtype=dtype, concat=concat)
    if labels is not None:
        raise ValueError(f"this {spec.kind} model conditions on context arrays, not labels")
    model_fn = make_model_fn(spec.build(dtype), spec.network_params(params))
    cond = Conditioning(context=spec.check_context(context, "context"), concat=concat)
    if plain:
        return conditioned_eps_fn(model_fn, cond)
    if null_context is None:
        raise ValueError(f"guidance={guidance} needs null_context (the negative or empty prompt's context); "
                         "guidance=1 needs none")
    null = spec.check_context(null_context, "null_context")
    if null.shape[-2:] != cond.context.shape[-2:]:
        raise ValueError(f"context {tuple(cond.context.shape)} and null_context {tuple(null.shape)} must have the "
                         "same [M, D]")
    return guided_by(model_fn, cond, Conditioning(context=null, concat=concat), guidance, rescale=rescale)


def _batch(context, labels, given) -> int:
    for x in given:
        if x is not None:
            return int(np.shape(x)[0])
    if context is not None and np.ndim(context) == 3:
        return int(np.shape(context)[0])
    if labels is not None and np.ndim(labels) == 1:
        return int(np.shape(labels)[0])
    return 1


def _keys(seed):
    try:
        key = jax.random.key(operator.index(seed))
    except TypeError:
        raise ValueError(f"seed must be an integer; got {seed!r}") from None
    return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)


def _normal(given, key, shape, name):
    if given is None:
        return jax.random.normal(key, shape, jnp.float32)
    if tuple(np.shape(given)) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {tuple(np.shape(given))}")
    return jnp.asarray(given, jnp.float32)


def _images(spec: ModelSpec, image, name: str = "image", height=None, width=None):
    """Images ``[B, H, W, C]`` in [-1, 1] at a size the model takes (``height``/``width`` when given)."""
    C = spec.output_shape[2]
    if np.ndim(image) == 3:
        image = np.asarray(image)[None]
    if np.ndim(image) != 4 or np.shape(image)[-1] != C:
        raise ValueError(f"{name} must be images [B, H, W, {C}] in [-1, 1]; got shape {np.shape(image)}")
    H, W = np.shape(image)[1:3]
    if (height is not None and H != height) or (width is not None and W != width):
        raise ValueError(f"{name} is {H}x{W}; the run's height x width is {height}x{width}")
    try:
        latent_size(spec, H, W)
    except ValueError as e:
        raise ValueError(f"{name} is {H}x{W}: {e}") from None
    x = jnp.asarray(image, jnp.float32)
    if not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(f"{name} has non-finite values")
    return x


def _encode(spec: ModelSpec, params, x, encoder_noise):
    """Images -> the diffusion's space (a latent model's scaled posterior mean, or sample with ``encoder_noise``)."""
    if spec.autoencoder is None:
        if encoder_noise is not None:
            raise ValueError("encoder_noise applies to latent models (a pixel model has no encoder)")
        return x
    h, w = latent_size(spec, x.shape[1], x.shape[2])
    lat_ch = spec.autoencoder.latent_shape[1]
    noise = None if encoder_noise is None else _normal(encoder_noise, None, (x.shape[0], h, w, lat_ch), "encoder_noise")
    if noise is None:
        return _jitted(spec, "encode")(params, x, jnp.zeros((x.shape[0], h, w, lat_ch), jnp.float32))
    return _jitted(spec, "encode")(params, x, noise)


def encode_images(spec: ModelSpec, params, images, encoder_noise=None):
    """Images ``[B, H, W, C]`` in [-1, 1] -> the diffusion's space, as the pipelines encode them: a latent model's
    scaled posterior mean (or ``mean + std * encoder_noise``), a pixel model's images themselves."""
    return _encode(spec, params, _images(spec, images), encoder_noise)


def _decode(spec: ModelSpec, params, z, decode: bool):
    if not decode:
        return z
    x = z if spec.autoencoder is None else _jitted(spec, "decode")(params, z)
    return jnp.clip(x, -1.0, 1.0)


def _mask(mask, batch: int, height: int, width: int):
    """A mask as ``[B, H, W, 1]`` float32 in {0, 1} (1 = repaint), binarised at 0.5."""
    m = np.asarray(mask, np.float32)
    if m.ndim == 4 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3 or m.shape[1:] != (height, width) or m.shape[0] not in (1, batch):
        raise ValueError(f"mask must be [{height}, {width}] or [B, {height}, {width}] (the image's size, 1 = repaint); "
                         f"got shape {np.shape(mask)}")
    if not np.all(np.isfinite(m)):
        raise ValueError("mask has non-finite values")
    m = (m >= 0.5).astype(np.float32)
    return jnp.asarray(np.broadcast_to(m, (batch, height, width))[..., None])


def _sampler_options(solver, eta, key_steps):
    if solver not in SOLVER_TABLE:
        raise ValueError(f"solver must be one of {', '.join(SOLVER_TABLE)}; got {solver!r}")
    stochastic = SOLVER_TABLE[solver].sde or eta > 0
    return {"solver": solver, "eta": eta, "key": key_steps if stochastic else None}


def _clip(spec: ModelSpec):
    """The paper's x0 clipping to [-1, 1], for pixel models only (latents are not bounded like pixels)."""
    return 1.0 if spec.autoencoder is None else None


def _run(spec, eps_fn, x_start, tau, solver, eta, key_steps):
    return sample(eps_fn, spec.make_schedule(), x_start, timesteps=tau, prediction_type=spec.prediction_type,
                  clip_x0=_clip(spec), **_sampler_options(solver, eta, key_steps))


def _no_concat(spec: ModelSpec, what: str) -> None:
    if spec.concat is not None:
        raise ValueError(f"this model is conditioned by concatenation ({spec.concat}); {what} takes a model without "
                         f"it{' (use inpaint)' if spec.concat == 'sd_inpaint' else ''}")


# ---------------------------------------------------------------------------------------------
# Prompts.


def encode_prompts(spec: ModelSpec, params, tokenizer, prompts, negative_prompts=None, *, clip_skip: int | None = None):
    """``(context, null_context)``, each ``[B, L, D]``: the model's text encoder (``spec.encode_text``) on the
    ``tokenizer``'s ids of ``prompts`` (a string or a non-empty list of B strings) and of ``negative_prompts``
    (None: the empty prompt, diffusers' default; a string for all, or B strings), in one call. ``clip_skip``:
    the hidden state read (default: the spec's)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts) if isinstance(prompts, (list, tuple)) else prompts
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a string or a non-empty list of strings; got {prompts!r}")
    B = len(prompts)
    if negative_prompts is None or isinstance(negative_prompts, str):
        negative = [negative_prompts or ""] * B
    else:
        negative = list(negative_prompts)
        if len(negative) != B or not all(isinstance(p, str) for p in negative):
            raise ValueError(f"negative_prompts must be None, a string or {B} strings (one per prompt); got "
                             f"{negative_prompts!r}")
    if getattr(spec, "text_encoder", None) is None:
        raise ValueError(f"this {spec.kind} model has no text encoder: give context arrays computed elsewhere (or "
                         "convert the Stable Diffusion folder with its text_encoder/ and tokenizer/)")
    context = _jitted(spec, "encode_text", clip_skip)(params, jnp.asarray(tokenizer(prompts + negative)))
    return context[:B], context[B:]


# ---------------------------------------------------------------------------------------------
# The pipelines.


def text_to_image(spec: ModelSpec, params, context=None, null_context=None, *, labels=None, guidance=None,
                  num_steps: int | None = None, solver: str = "ddim", spacing: str | None = None, timesteps=None,
                  eta: float = 0.0, seed: int = 0, latents=None, height: int | None = None, width: int | None = None,
                  rescale: float = 0.0, dtype: str = "float32", decode: bool = True):
    """Images ``[B, H, W, C]`` in [-1, 1] sampled under ``context`` (``[B, M, D]``: one per image; ``[M, D]``
    with ``latents`` or for one image), guided against ``null_context`` with ``guidance`` (None or 1: none; SD's usual
    scale is 7.5).

    ``latents``: x_T ``[B, h, w, C]`` (diffusers' ``latents=``; default: drawn from ``seed``); ``height`` and
    ``width``: the images' (default: the spec's; latents ``H / f``). ``solver``, ``spacing``, ``timesteps``
    and ``eta`` as :func:`ddim_jax.solvers.sample`'s. ``decode=False`` returns the latents."""
    _no_concat(spec, "text_to_image")
    h, w = latent_size(spec, height, width)
    k_T, _, k_steps = _keys(seed)
    B = _batch(context, labels, (latents,))
    x_T = _normal(latents, k_T, (B, h, w, spec.channels), "latents")
    eps_fn = _eps_fn(spec, params, context, null_context, labels, guidance, None, dtype, rescale)
    z = _run(spec, eps_fn, x_T, _tau(spec, num_steps, spacing, timesteps, solver), solver, eta, k_steps)
    return _decode(spec, params, z, decode)


def image_to_image(spec: ModelSpec, params, image, context=None, null_context=None, *, strength: float = 0.8,
                   labels=None, guidance=None, num_steps: int | None = None, solver: str = "ddim",
                   spacing: str | None = None, timesteps=None, eta: float = 0.0, seed: int = 0, noise=None,
                   encoder_noise=None, rescale: float = 0.0, dtype: str = "float32", decode: bool = True):
    """SDEdit: ``image`` ``[B, H, W, C]`` in [-1, 1] encoded (latent models), noised to the timestep ``strength``
    selects (:func:`start_steps`) with ``noise`` (default: drawn from ``seed``) and denoised over the remaining
    steps under ``context`` (or ``labels``) and ``guidance``, as :func:`text_to_image`. ``strength`` 1 starts from
    (almost) pure noise at tau's last step; small values keep more of the image."""
    _no_concat(spec, "image_to_image")
    x = _images(spec, image)
    _, k_noise, k_steps = _keys(seed)
    tau = start_steps(_tau(spec, num_steps, spacing, timesteps, solver), strength)
    z0 = _encode(spec, params, x, encoder_noise)
    a = float(spec.make_schedule().alpha_bar(int(tau[-1])))
    x_start = np.sqrt(a) * z0 + np.sqrt(1.0 - a) * _normal(noise, k_noise, z0.shape, "noise")
    eps_fn = _eps_fn(spec, params, context, null_context, labels, guidance, None, dtype, rescale)
    return _decode(spec, params, _run(spec, eps_fn, x_start, tau, solver, eta, k_steps), decode)


def inpaint_condition(spec: ModelSpec, params, image, mask, encoder_noise=None):
    """An ``sd_inpaint`` model's extra channels for ``image`` ``[B, H, W, C]`` in [-1, 1] and ``mask`` (1 =
    repaint), as diffusers' inpainting pipeline builds them: the binarised mask at the latents' size (nearest,
    torch's ``interpolate``), then the scaled latents of ``image * (mask < 0.5)``: ``[B, h, w, 1 + C_latent]``."""
    if spec.concat != "sd_inpaint":
        raise ValueError(f"inpaint_condition is for sd_inpaint models; this model's concat is {spec.concat!r}")
    x = _images(spec, image)
    m = _mask(mask, x.shape[0], x.shape[1], x.shape[2])
    h, w = latent_size(spec, x.shape[1], x.shape[2])
    masked = _encode(spec, params, x * (1.0 - m), encoder_noise)
    return jnp.concatenate([nearest_downsample(m, h, w), masked], axis=-1)


def inpaint(spec: ModelSpec, params, image, mask, context=None, null_context=None, *, labels=None, guidance=None,
            num_steps: int | None = None, solver: str = "ddim", spacing: str | None = None, timesteps=None,
            eta: float = 0.0, seed: int = 0, latents=None, strength: float = 1.0, noise=None, encoder_noise=None,
            resample: int = 1, rescale: float = 0.0, dtype: str = "float32", decode: bool = True):
    """``image`` ``[B, H, W, C]`` in [-1, 1] with the region where ``mask`` is 1 (white) generated anew.

    An ``sd_inpaint`` model (SD's 9-channel UNets) sees the mask and the masked image's latents
    (:func:`inpaint_condition`, its ``encoder_noise``) at every step; it runs any solver, from ``latents``
    (x_T, default drawn from ``seed``) or, with ``strength`` < 1, from the image's latents noised as in
    :func:`image_to_image` (``noise``). Any other model is inpainted by RePaint
    (:func:`ddim_jax.sampling.repaint_sample`: DDIM with ``eta``, ``resample`` repetitions of each step): after
    every step the known region (mask 0, at the latents' size for a latent model: nearest) is replaced by the
    image's (latents') forward-noised to that step, and at the last step by the image (latents) itself, so a
    pixel model returns the image exactly there; ``encoder_noise`` then encodes the image."""
    x = _images(spec, image)
    B, H, W = x.shape[:3]
    h, w = latent_size(spec, H, W)
    m = _mask(mask, B, H, W)
    k_T, k_noise, k_steps = _keys(seed)
    tau = start_steps(_tau(spec, num_steps, spacing, timesteps, solver), strength)
    rows = [("latents", latents), ("context", context if np.ndim(context) == 3 else None),
            ("labels", labels if np.ndim(labels) == 1 else None)]
    for name, v in rows:
        if v is not None and np.shape(v)[0] != B:
            raise ValueError(f"{name} has {np.shape(v)[0]} rows; image has {B} (give one per image)")
    if spec.concat == "sd_inpaint":
        concat = inpaint_condition(spec, params, x, m, encoder_noise)
        eps_fn = _eps_fn(spec, params, context, null_context, labels, guidance, concat, dtype, rescale)
        x_T = _normal(latents, k_T, (B, h, w, spec.channels), "latents")
        if strength < 1:
            z0 = _encode(spec, params, x, None)
            a = float(spec.make_schedule().alpha_bar(int(tau[-1])))
            x_T = np.sqrt(a) * z0 + np.sqrt(1.0 - a) * _normal(noise, k_noise, z0.shape, "noise")
        return _decode(spec, params, _run(spec, eps_fn, x_T, tau, solver, eta, k_steps), decode)
    _no_concat(spec, "inpaint (RePaint)")
    if solver != "ddim":
        raise ValueError(f"inpainting a model without an inpainting UNet (RePaint) runs DDIM (solver='ddim', with "
                         f"eta); got solver={solver!r}")
    z0 = _encode(spec, params, x, encoder_noise)
    keep = 1.0 - nearest_downsample(m, h, w)
    x_T = _normal(latents, k_T, z0.shape, "latents")
    if strength < 1:
        a = float(spec.make_schedule().alpha_bar(int(tau[-1])))
        x_T = np.sqrt(a) * z0 + np.sqrt(1.0 - a) * _normal(noise, k_noise, z0.shape, "noise")
    eps_fn = _eps_fn(spec, params, context, null_context, labels, guidance, None, dtype, rescale)
    z = repaint_sample(eps_fn, spec.make_schedule(), x_T, z0, keep > 0.5, timesteps=tau, key=k_steps, eta=eta,
                       resample=resample, prediction_type=spec.prediction_type, clip_x0=_clip(spec))
    return _decode(spec, params, z, decode)


# ---------------------------------------------------------------------------------------------
# Inversion.


def invert(spec: ModelSpec, params, image, context=None, null_context=None, *, labels=None, guidance=1.0,
           num_steps: int | None = None, spacing: str = "uniform", timesteps=None, encoder_noise=None,
           dtype: str = "float32"):
    """DDIM inversion: ``image`` ``[B, H, W, C]`` in [-1, 1] -> x_T ``[B, h, w, C]``, the eta = 0 ODE run forward
    over tau (:func:`ddim_jax.sampling.ddim_encode`) under ``context`` (or ``labels``) and ``guidance`` (1: the
    exact inverse of DDIM's decoder as S grows; guided inversion drifts)."""
    _no_concat(spec, "invert")
    x = _images(spec, image)
    z0 = _encode(spec, params, x, encoder_noise)
    eps_fn = _eps_fn(spec, params, context, null_context, labels, guidance, None, dtype, 0.0)
    return ddim_encode(eps_fn, spec.make_schedule(), z0, timesteps=_tau(spec, num_steps, spacing, timesteps, "ddim"),
                       prediction_type=spec.prediction_type)


def edit(spec: ModelSpec, params, image, context, edited_context, null_context=None, *, guidance=1.0,
         edit_guidance=7.5, num_steps: int | None = None, spacing: str = "uniform", timesteps=None,
         encoder_noise=None, dtype: str = "float32", decode: bool = True):
    """Inversion editing: ``image`` inverted under ``context`` (its prompt) with ``guidance`` (:func:`invert`),
    then regenerated by DDIM (eta = 0) from that x_T under ``edited_context`` (the edited prompt) with
    ``edit_guidance`` against ``null_context``. With ``edited_context = context`` and both guidances 1 it
    reconstructs the image (:func:`inversion_error`)."""
    tau = _tau(spec, num_steps, spacing, timesteps, "ddim")
    x_T = invert(spec, params, image, context, null_context, guidance=guidance, num_steps=None, timesteps=tau,
                 encoder_noise=encoder_noise, dtype=dtype)
    eps_fn = _eps_fn(spec, params, edited_context, null_context, None, edit_guidance, None, dtype, 0.0)
    z = ddim_sample(eps_fn, spec.make_schedule(), x_T, timesteps=tau, prediction_type=spec.prediction_type)
    return _decode(spec, params, z, decode)


def reconstruction_errors(eps_fn, schedule, x0, steps, *, spacing: str = "uniform",
                          prediction_type: str = "epsilon") -> dict:
    """``{S: mean squared error}`` of ``x0`` encoded by DDIM (:func:`ddim_jax.sampling.ddim_encode`) and decoded
    back (:func:`ddim_jax.sampling.ddim_sample`) over the same S timesteps, for each S in ``steps``, and the
    reconstructions: ``(errors, {S: x0_hat})``. Any ``eps_fn`` (a model's, the oracle's)."""
    errors, recons = {}, {}
    for S in steps:
        tau = make_timesteps(schedule.num_timesteps, S, spacing, schedule=schedule)
        x_T = ddim_encode(eps_fn, schedule, x0, timesteps=tau, prediction_type=prediction_type)
        recons[int(S)] = ddim_sample(eps_fn, schedule, x_T, timesteps=tau, prediction_type=prediction_type)
        errors[int(S)] = float(jnp.mean((recons[int(S)] - x0) ** 2))
    return errors, recons


def inversion_error(spec: ModelSpec, params, image, context=None, *, labels=None, steps=(5, 10, 20, 50),
                    spacing: str = "uniform", dtype: str = "float32") -> dict:
    """The reconstruction error of DDIM inversion at guidance 1 for each step count S in ``steps``: ``image``
    encoded to x_T (:func:`invert`) and decoded back over the same tau (:func:`reconstruction_errors`). Returns
    ``{S: {"latent_mse": ..., "image_mse": ...}}``: the mean squared error in the diffusion's space (against the
    image's latents: the ODE's own error, which shrinks as S grows) and in image space ([-1, 1]; a latent
    model's also holds its autoencoder's reconstruction error, which does not)."""
    x = _images(spec, image)
    z0 = _encode(spec, params, x, None)
    eps_fn = _eps_fn(spec, params, context, None, labels, None, None, dtype, 0.0)
    errors, recons = reconstruction_errors(eps_fn, spec.make_schedule(), z0, steps, spacing=spacing,
                                           prediction_type=spec.prediction_type)
    return {S: {"latent_mse": e, "image_mse": float(jnp.mean((_decode(spec, params, recons[S], True) - x) ** 2))}
            for S, e in errors.items()}
