"""The generalized DDIM step (eq. 12), the scan sampler, the DDIM encoder, and slerp.

``eps_fn(x_t, t)`` is any function returning the model output for a batch ``x_t`` ``[B, ...]`` at
0-indexed timesteps ``t`` (int32 ``[B]``): a trained network, the analytic oracle, or a lambda.
Pass networks as ``jax.tree_util.Partial(model.apply, variables)`` (see
:func:`ddim_jax.unet.make_eps_fn`) so their parameters are arguments of the compiled sampler rather
than constants baked into it; the sampler is then compiled once per (shapes, S, options) and reused.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax.diffusion import PREDICTION_TYPES, _bcast, predict_x0_eps
from ddim_jax.schedules import SPACINGS, Schedule, _check_choice, make_timesteps


def threshold_x0(x0, *, clip_x0: float | None = None, dynamic_threshold: float | None = None):
    """Clips x0 to ``[-clip_x0, clip_x0]``, then (if given) applies Imagen's dynamic thresholding:
    per example, ``s = max(1, quantile(|x0|, dynamic_threshold))`` and ``x0 <- clip(x0, -s, s) / s``."""
    if clip_x0 is not None:
        x0 = jnp.clip(x0, -clip_x0, clip_x0)
    if dynamic_threshold is not None:
        B = x0.shape[0]
        s = jnp.quantile(jnp.abs(x0).reshape(B, -1), dynamic_threshold, axis=1)
        s = _bcast(jnp.maximum(s, 1.0), x0)
        x0 = jnp.clip(x0, -s, s) / s
    return x0


def ddim_step(
    x_t,
    model_out,
    *,
    a_t,
    a_prev,
    noise=None,
    eta=0.0,
    sigma_hat: bool = False,
    prediction_type: str = "epsilon",
    clip_x0: float | None = None,
    dynamic_threshold: float | None = None,
):
    """One step of the generalized process, from alpha-bar ``a_t`` to ``a_prev`` (eq. 12).

    ``x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z`` with
    ``sigma = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)``: eta = 0 is DDIM
    (deterministic), eta = 1 is DDPM. ``1 - a_prev - sigma^2`` is clamped at 0 (it goes negative only
    for eta > 1).

    ``sigma_hat=True`` is the paper's larger-variance DDPM (Table 1, last row), in the DDPM
    posterior-mean form its code uses: ``x_prev = mu~(x_t, x0) + sqrt(1 - a_t / a_prev) z``, with no
    noise on the step that lands on x_0 (``a_prev = 1``). The paper's code clips x0 to [-1, 1]
    there: pass ``clip_x0=1.0`` to reproduce it.

    If x0 is clipped or thresholded, eps is recomputed from it so the two stay consistent.
    ``a_t``, ``a_prev`` and ``noise`` are keyword-only. ``a_t`` and ``a_prev`` are scalars or
    ``[B]``; ``noise`` is a standard normal draw of x's shape, required whenever the step can be
    stochastic. ``x_t`` must be floating-point (an integer one raises ValueError rather than being
    truncated); a concrete ``eta`` must be finite and >= 0 (a traced one is not checked). Arithmetic
    is float32; returns ``(x_prev, x0_pred)`` in x's dtype.
    """
    _check_float("x_t", x_t)
    if isinstance(eta, numbers.Real):
        _check_eta(eta)
    stochastic = sigma_hat or not (isinstance(eta, numbers.Number) and eta == 0)
    if stochastic and noise is None:
        raise ValueError("noise is required when eta > 0 or sigma_hat=True (otherwise the step would "
                         "silently add no noise)")
    x0, eps = predict_x0_eps(model_out, x_t, a_t, prediction_type)
    at, ap = _bcast(a_t, x_t), _bcast(a_prev, x_t)
    x = x_t.astype(jnp.float32)
    if clip_x0 is not None or dynamic_threshold is not None:
        x0 = threshold_x0(x0, clip_x0=clip_x0, dynamic_threshold=dynamic_threshold)
        eps = (x - jnp.sqrt(at) * x0) / jnp.sqrt(1.0 - at)
    if sigma_hat:
        beta = 1.0 - at / ap
        mean = (jnp.sqrt(ap) * beta * x0 + jnp.sqrt(1.0 - beta) * (1.0 - ap) * x) / (1.0 - at)
        sigma = jnp.where(ap < 1.0, jnp.sqrt(beta), 0.0)
    elif stochastic:
        sigma = eta * jnp.sqrt((1.0 - ap) / (1.0 - at) * (1.0 - at / ap))
        mean = jnp.sqrt(ap) * x0 + jnp.sqrt(jnp.maximum(1.0 - ap - sigma**2, 0.0)) * eps
    else:  # sigma = 0; also valid at a_t = 1, which the encoder starts from
        mean = jnp.sqrt(ap) * x0 + jnp.sqrt(1.0 - ap) * eps
    x_prev = mean + sigma * noise.astype(jnp.float32) if stochastic else mean
    return x_prev.astype(x_t.dtype), x0.astype(x_t.dtype)


# ---------------------------------------------------------------------------------------------
# Argument checks shared by the sampler and the encoder (host side, before anything is traced).


def _as_partial(eps_fn):
    if not callable(eps_fn):
        raise TypeError(f"eps_fn must be callable as eps_fn(x_t, t); got {type(eps_fn).__name__}")
    return eps_fn if isinstance(eps_fn, jax.tree_util.Partial) else jax.tree_util.Partial(eps_fn)


def _resolve_timesteps(schedule, num_steps, spacing, timesteps) -> np.ndarray:
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a ddim_jax.Schedule; got {type(schedule).__name__}")
    T = schedule.num_timesteps
    if timesteps is None:
        if num_steps is None:
            raise ValueError("num_steps is required unless timesteps is given")
        return make_timesteps(T, num_steps, spacing, schedule=schedule)  # karras/exponential need it
    if num_steps is not None:
        raise ValueError("give num_steps or timesteps, not both")
    tau = np.asarray(timesteps)
    if (tau.ndim != 1 or tau.size < 1 or not np.issubdtype(tau.dtype, np.integer)
            or np.any(np.diff(tau) <= 0) or tau[0] < 0 or tau[-1] > T - 1):
        raise ValueError(f"timesteps must be a non-empty 1-D strictly increasing integer array in "
                         f"[0, {T - 1}]; got {timesteps!r}")
    return tau.astype(np.int32)


def _check_eta(eta):
    if not isinstance(eta, numbers.Real) or not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite real number >= 0 (0 = DDIM, 1 = DDPM); got {eta!r}")


def _check_float(name, x):
    dtype = jnp.asarray(x).dtype if getattr(x, "dtype", None) is None else x.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array; got {jnp.dtype(dtype).name}")


def _check_x(name, x):
    if not hasattr(x, "shape") or len(x.shape) < 1 or x.shape[0] < 1:
        raise ValueError(f"{name} must be an array of shape [batch, ...]; got {getattr(x, 'shape', type(x))}")
    _check_float(name, x)
    return x if isinstance(x, jax.Array) else jnp.asarray(x)


def _prepare(eps_fn, schedule, x, x_name, num_steps, spacing, timesteps, prediction_type):
    """The checks every sampler and the encoder share: ``(eps_fn as a Partial, x, tau)``."""
    eps_fn = _as_partial(eps_fn)
    x = _check_x(x_name, x)
    _check_choice("spacing", spacing, SPACINGS)
    tau = _resolve_timesteps(schedule, num_steps, spacing, timesteps)
    _check_prediction(schedule, tau, prediction_type)
    return eps_fn, x, tau


def _decoding_steps(tau):
    """``(ts, prev)``: the timesteps a decoder visits (tau descending) and the one each step lands on
    (the next, and -1 = x_0 with alpha-bar 1 after the last)."""
    ts = np.ascontiguousarray(np.asarray(tau)[::-1])
    return ts, np.concatenate([ts[1:], [-1]]).astype(ts.dtype)


def _check_thresholds(clip_x0, dynamic_threshold):
    for name, v, lo, hi in (("clip_x0", clip_x0, 0.0, np.inf), ("dynamic_threshold", dynamic_threshold, 0.0, 1.0)):
        if v is not None and not (isinstance(v, numbers.Real) and lo < v <= hi):
            raise ValueError(f"{name} must be None or a number in ({lo}, {hi}]; got {v!r}")


def _check_prediction(schedule, tau, prediction_type):
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type != "v" and float(schedule.alpha_bar(int(tau[-1]))) == 0.0:
        raise ValueError(f"prediction_type={prediction_type!r} cannot be used with a zero-terminal-SNR "
                         f"schedule (alpha_bar = 0 at t = {int(tau[-1])} divides by zero); train and "
                         "sample with prediction_type='v'")


def _model(eps_fn, x, t):
    t = jnp.full((x.shape[0],), t, jnp.int32)
    out = eps_fn(x, t)
    if out.shape != x.shape:
        raise ValueError(f"eps_fn returned shape {tuple(out.shape)}; expected the shape of x_t {tuple(x.shape)}")
    return out


# ---------------------------------------------------------------------------------------------
# Decoding: x_T -> x_0.


@functools.partial(jax.jit, static_argnames=("stochastic", "sigma_hat", "prediction_type", "clip_x0",
                                             "dynamic_threshold", "return_trajectory"))
def _sample_scan(eps_fn, x_T, ts, a_t, a_prev, eta, key, *, stochastic, sigma_hat, prediction_type,
                 clip_x0, dynamic_threshold, return_trajectory):
    def body(x, inp):
        i, t, at, ap = inp
        noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32) if stochastic else None
        x_prev, x0 = ddim_step(x, _model(eps_fn, x, t), a_t=at, a_prev=ap, noise=noise,
                               eta=eta if stochastic else 0.0, sigma_hat=sigma_hat,
                               prediction_type=prediction_type, clip_x0=clip_x0,
                               dynamic_threshold=dynamic_threshold)
        return x_prev, ((x_prev, x0) if return_trajectory else None)

    steps = jnp.arange(ts.shape[0], dtype=jnp.int32)
    x0, traj = jax.lax.scan(body, x_T, (steps, ts, a_t, a_prev))
    return (x0, *traj) if return_trajectory else x0


def ddim_sample(
    eps_fn,
    schedule: Schedule,
    x_T,
    num_steps: int | None = None,
    *,
    spacing: str = "uniform",
    timesteps=None,
    eta: float = 0.0,
    sigma_hat: bool = False,
    key=None,
    prediction_type: str = "epsilon",
    clip_x0: float | None = None,
    dynamic_threshold: float | None = None,
    return_trajectory: bool = False,
):
    """Decodes ``x_T`` into samples with the generalized process over a sub-sequence tau.

    The S model calls run as one ``jax.lax.scan`` inside one compiled program, visiting
    ``tau_S, ..., tau_1`` and landing on x_0 (alpha-bar 1). tau is ``make_timesteps(T, num_steps,
    spacing)`` or the given increasing ``timesteps``. ``eta`` and ``sigma_hat`` as in
    :func:`ddim_step`; stochastic sampling needs ``key``, and step ``i`` (0 = the first step, at
    tau_S) draws its noise from ``fold_in(key, i)``. ``eta`` is traced, so changing it does not
    recompile, and must be finite and >= 0. ``x_T`` must be floating-point (an integer one raises
    ValueError rather than being truncated at every step).

    Returns x_0 (x_T's shape and dtype), or with ``return_trajectory=True`` a tuple
    ``(x_0, xs, x0_preds)`` where ``xs[i]`` is x after step i (``xs[-1] == x_0``) and
    ``x0_preds[i]`` the x0 predicted at step i, each ``[S, *x_T.shape]``.
    """
    eps_fn, x_T, tau = _prepare(eps_fn, schedule, x_T, "x_T", num_steps, spacing, timesteps, prediction_type)
    _check_eta(eta)
    if sigma_hat and eta != 0:
        raise ValueError("sigma_hat=True replaces eta; leave eta at 0")
    stochastic = bool(sigma_hat or eta > 0)
    if stochastic and key is None:
        raise ValueError("key (a jax.random key) is required when eta > 0 or sigma_hat=True")
    _check_thresholds(clip_x0, dynamic_threshold)
    ts, prev = _decoding_steps(tau)
    # Host (numpy) arguments: jit moves them to the device on its fast path.
    return _sample_scan(
        eps_fn, x_T, ts, schedule.alpha_bar(ts), schedule.alpha_bar(prev),
        np.float32(eta), key if stochastic else None, stochastic=stochastic, sigma_hat=bool(sigma_hat),
        prediction_type=prediction_type, clip_x0=None if clip_x0 is None else float(clip_x0),
        dynamic_threshold=None if dynamic_threshold is None else float(dynamic_threshold),
        return_trajectory=bool(return_trajectory))


# ---------------------------------------------------------------------------------------------
# Encoding: x_0 -> x_T (Section 4.3).


@functools.partial(jax.jit, static_argnames=("prediction_type", "return_trajectory"))
def _encode_scan(eps_fn, x_0, ts, a_from, a_to, *, prediction_type, return_trajectory):
    def body(x, inp):
        t, af, at = inp
        _, eps = predict_x0_eps(_model(eps_fn, x, t), x, at, prediction_type)
        x_next, _ = ddim_step(x, eps, a_t=af, a_prev=at)
        return x_next, (x_next if return_trajectory else None)

    x_T, xs = jax.lax.scan(body, x_0, (ts, a_from, a_to))
    return (x_T, xs) if return_trajectory else x_T


def ddim_encode(
    eps_fn,
    schedule: Schedule,
    x_0,
    num_steps: int | None = None,
    *,
    spacing: str = "uniform",
    timesteps=None,
    prediction_type: str = "epsilon",
    return_trajectory: bool = False,
):
    """Encodes data ``x_0`` into latents ``x_T`` by running the eta = 0 ODE forward over tau.

    Step k goes from tau_{k-1} (x_0, alpha-bar 1, for k = 1) up to tau_k and evaluates the model at
    ``(x, tau_k)``: the same timestep as the decoding step tau_k -> tau_{k-1} it inverts, so
    encoding makes exactly as many model calls as :func:`ddim_sample` with the same tau, and
    ``ddim_sample(ddim_encode(x_0))`` converges to ``x_0`` as S grows. ``x_0`` must be floating-point
    (an integer one raises ValueError rather than being truncated at every step).

    Returns x_T, or ``(x_T, xs)`` with ``xs[k]`` the latent after step k (``xs[-1] == x_T``).
    """
    eps_fn, x_0, tau = _prepare(eps_fn, schedule, x_0, "x_0", num_steps, spacing, timesteps, prediction_type)
    prev = np.concatenate([[-1], tau[:-1]])
    return _encode_scan(eps_fn, x_0, tau, schedule.alpha_bar(prev), schedule.alpha_bar(tau),
                        prediction_type=prediction_type,
                        return_trajectory=bool(return_trajectory))


def slerp(z0, z1, alpha):
    """Spherical interpolation between two latents of the same shape (the paper's Figure 5).

    ``alpha`` is a scalar or a 1-D array of weights in [0, 1]; returns ``[len(alpha), *z0.shape]``
    for an array (``z0.shape`` for a scalar). The angle is taken over all entries of each latent;
    ``jax.vmap`` over pairs for a batch. Falls back to linear interpolation for (anti)parallel
    latents.
    """
    z0, z1 = jnp.asarray(z0, jnp.float32), jnp.asarray(z1, jnp.float32)
    if z0.shape != z1.shape:
        raise ValueError(f"z0 and z1 must have the same shape; got {z0.shape} and {z1.shape}")
    alpha = jnp.asarray(alpha, jnp.float32)
    if alpha.ndim > 1:
        raise ValueError(f"alpha must be a scalar or a 1-D array; got shape {alpha.shape}")
    cos = jnp.sum(z0 * z1) / (jnp.linalg.norm(z0) * jnp.linalg.norm(z1))
    theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
    a = alpha.reshape(alpha.shape + (1,) * z0.ndim)
    small = jnp.sin(theta) < 1e-6
    safe_sin = jnp.where(small, 1.0, jnp.sin(theta))
    w0 = jnp.where(small, 1.0 - a, jnp.sin((1.0 - a) * theta) / safe_sin)
    w1 = jnp.where(small, a, jnp.sin(a * theta) / safe_sin)
    return w0 * z0 + w1 * z1


# ---------------------------------------------------------------------------------------------
# Inpainting any model: the known region replaced by the forward-noised observation (RePaint).


@functools.partial(jax.jit, static_argnames=("stochastic", "prediction_type", "clip_x0"))
def _repaint_scan(eps_fn, x_T, known, keep, ts, a_t, a_prev, eta, key, resample, *, stochastic, prediction_type,
                  clip_x0):
    def one_step(x, i, r, t, at, ap):
        k = jax.random.fold_in(jax.random.fold_in(key, i), r)
        k_step, k_known, k_back = jax.random.split(k, 3)
        noise = jax.random.normal(k_step, x.shape, jnp.float32) if stochastic else None
        x_prev, _ = ddim_step(x, _model(eps_fn, x, t), a_t=at, a_prev=ap, noise=noise,
                              eta=eta if stochastic else 0.0, prediction_type=prediction_type, clip_x0=clip_x0)
        z = jax.random.normal(k_known, x.shape, jnp.float32)
        seen = jnp.sqrt(ap) * known + jnp.sqrt(1.0 - ap) * z  # q(x_prev | known); exactly known at a_prev = 1
        x_prev = jnp.where(keep, seen.astype(x.dtype), x_prev)
        # Resampling: back to t through q(x_t | x_prev) (the forward step from a_prev to a_t), then again.
        back = jnp.sqrt(at / ap) * x_prev + jnp.sqrt(1.0 - at / ap) * jax.random.normal(k_back, x.shape, jnp.float32)
        return jnp.where(r < resample - 1, back.astype(x.dtype), x_prev)

    def body(x, inp):
        i, t, at, ap = inp  # resample is traced: one program for every count
        return jax.lax.fori_loop(0, resample, lambda r, x: one_step(x, i, r, t, at, ap), x), None

    steps = jnp.arange(ts.shape[0], dtype=jnp.int32)
    x0, _ = jax.lax.scan(body, x_T, (steps, ts, a_t, a_prev))
    return x0


def repaint_sample(
    eps_fn,
    schedule: Schedule,
    x_T,
    known,
    keep,
    num_steps: int | None = None,
    *,
    key,
    spacing: str = "uniform",
    timesteps=None,
    eta: float = 0.0,
    resample: int = 1,
    prediction_type: str = "epsilon",
    clip_x0: float | None = None,
):
    """Inpainting with any unconditional or conditional ``eps_fn``: DDIM over tau (as :func:`ddim_sample`)
    where after every step the region ``keep`` takes the forward-noised ``known`` at the step's alpha-bar,
    ``sqrt(a_prev) known + sqrt(1 - a_prev) z`` (Lugmayr et al. 2022, RePaint). The last step lands on
    alpha-bar 1, where that is ``known`` itself: the result equals ``known`` exactly where ``keep``.

    ``known``: x_T's shape (the observed sample); ``keep``: a boolean (or 0/1) array broadcastable to it,
    true where ``known`` is kept. ``resample`` (RePaint's U, >= 1): each step is taken ``resample`` times,
    going back from a_prev to a_t through the forward process ``q(x_t | x_prev)`` between them (1 = no
    resampling). ``eta`` as in :func:`ddim_step` (RePaint uses the DDPM sampler, eta = 1). ``key`` is
    required (the known region's noise): step ``i``'s repetition ``r`` draws from ``fold_in(fold_in(key, i),
    r)``. ``clip_x0`` as in :func:`ddim_step`. Returns x_0 (x_T's shape and dtype)."""
    eps_fn, x_T, tau = _prepare(eps_fn, schedule, x_T, "x_T", num_steps, spacing, timesteps, prediction_type)
    _check_eta(eta)
    _check_thresholds(clip_x0, None)
    if isinstance(resample, bool) or not isinstance(resample, (int, np.integer)) or resample < 1:
        raise ValueError(f"resample must be an integer >= 1 (1 = no resampling); got {resample!r}")
    if key is None:
        raise ValueError("key (a jax.random key) is required: the known region is noised afresh at every step")
    known = jnp.asarray(known, x_T.dtype)
    if known.shape != x_T.shape:
        raise ValueError(f"known must have x_T's shape {tuple(x_T.shape)}; got {tuple(known.shape)}")
    keep = jnp.asarray(keep)
    try:
        keep = jnp.broadcast_to(keep.astype(bool), x_T.shape)
    except ValueError:
        raise ValueError(f"keep must broadcast to x_T's shape {tuple(x_T.shape)}; got {tuple(keep.shape)}") from None
    ts, prev = _decoding_steps(tau)
    return _repaint_scan(eps_fn, x_T, known, keep, ts, schedule.alpha_bar(ts), schedule.alpha_bar(prev),
                         np.float32(eta), key, np.int32(resample), stochastic=bool(eta > 0),
                         prediction_type=prediction_type, clip_x0=None if clip_x0 is None else float(clip_x0))
