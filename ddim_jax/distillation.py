"""The mathematics of few-step distillation: progressive distillation's target (Salimans and Ho, ICLR 2022) and
consistency distillation's consistency function, teacher ODE step and metrics (Song et al., ICML 2023), and
consistency models' multistep sampling. Pure functions of arrays and alpha-bar values; the training objectives
are :mod:`ddim_jax.training.distill`'s.

Notation: ``a`` is alpha-bar, ``alpha = sqrt(a)``, ``sigma = sqrt(1 - a)``, ``z_t = alpha_t x + sigma_t eps``.
Timesteps are the schedule's 0-indexed ones; ``-1`` is x_0 itself (alpha-bar 1).

Progressive distillation, a round of N student steps: the teacher samples at 2N steps on the grid
:func:`progressive_grid` (``"trailing"`` spacing, so the student's N steps are every other teacher step and the
first step starts at T - 1). For a student step t -> t'' the teacher makes two DDIM steps t -> t' -> t''
(:func:`ddim_to`), and the student's x-prediction target is the x that takes z_t to the teacher's z_t'' in one
DDIM step (:func:`progressive_target`):
``x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)``,
weighted by ``max(SNR, 1)`` ("truncated SNR") or ``SNR + 1`` (:func:`snr_weight`).

Consistency distillation: ``f(x, t) = c_skip(t) x + c_out(t) F(x, t)`` with F the network's x0-prediction and
latent consistency models' coefficients on a DDPM schedule (:func:`consistency_coefficients`):
``c_skip = s_d^2 / (s^2 + s_d^2)``, ``c_out = s / sqrt(s^2 + s_d^2)``, ``s = scaling x (t - t_min)``, so at the
smallest time ``t_min`` c_skip is 1 and c_out 0 exactly: ``f(x, t_min) = x``. The target of a step n + 1 -> n
of the discretisation is the EMA network's ``f(x^_n, t_n)``, ``x^_n`` the teacher's ODE step from ``x_{n+1}``
(DDIM, or DPM-Solver++ 2M over t_{n+2} -> t_{n+1} -> t_n, :func:`teacher_step_2m`); the metric is L2 or
pseudo-Huber ``sqrt(||a - b||^2 + c^2) - c`` (:func:`metric`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax.diffusion import _bcast
from ddim_jax.schedules import Schedule, _check_choice, make_timesteps

METHODS = ("progressive", "consistency")
WEIGHTINGS = ("truncated_snr", "snr_plus_one")
METRICS = ("l2", "pseudo_huber")
ODE_SOLVERS = ("ddim", "dpmpp_2m")
SAMPLE_SPACING = "trailing"  # a distilled model's sampling timesteps: the first step at T - 1


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def ddim_to(z, x0, a_from, a_to):
    """The deterministic DDIM step from alpha-bar ``a_from`` to ``a_to`` given the x0-prediction ``x0``:
    ``alpha_to x0 + (sigma_to / sigma_from) (z - alpha_from x0)`` (``a_from`` < 1; ``a_to = 1`` lands on x0)."""
    z, x0 = _f32(z), _f32(x0)
    af, at = _bcast(a_from, z), _bcast(a_to, z)
    return jnp.sqrt(at) * x0 + jnp.sqrt(1.0 - at) / jnp.sqrt(1.0 - af) * (z - jnp.sqrt(af) * x0)


# ---------------------------------------------------------------------------------------------
# Progressive distillation.


def progressive_grid(num_timesteps: int, num_steps: int) -> np.ndarray:
    """The teacher's 2N-step grid of a round with ``num_steps`` = N student steps, increasing, with x_0 first:
    ``[-1, tau_1, ..., tau_2N]`` (tau: ``make_timesteps(T, 2N, "trailing")``). The student's N steps are
    ``grid[2::2]`` (which is ``make_timesteps(T, N, "trailing")``) and step i (1-based) goes ``grid[2i] ->
    grid[2i - 2]`` through the teacher's ``grid[2i - 1]``."""
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer; got {num_steps!r}")
    if 2 * num_steps > num_timesteps:
        raise ValueError(f"num_steps must be <= num_timesteps / 2 ({num_timesteps // 2}): its teacher takes twice "
                         f"as many steps; got {num_steps}")
    grid = np.concatenate([[-1], make_timesteps(num_timesteps, 2 * num_steps, "trailing")]).astype(np.int32)
    assert np.array_equal(grid[2::2], make_timesteps(num_timesteps, num_steps, "trailing"))
    return grid


def progressive_target(x0_fn, z, t, t_mid, t_end, a_t, a_mid, a_end):
    """``(x~, z_end)``: the student's x-prediction target at ``z`` (timesteps ``t``, alpha-bar ``a_t``) and the
    teacher's result of its two DDIM steps t -> t_mid -> t_end. ``x0_fn(x, t)``: the teacher's x0-prediction
    (guided, for a guided teacher). ``a_end`` may be 1 (the last step lands on x_0: then ``x~ = z_end``)."""
    z = _f32(z)
    x1 = _f32(x0_fn(z, t))
    z_mid = ddim_to(z, x1, a_t, a_mid)
    x2 = _f32(x0_fn(z_mid, t_mid))
    z_end = ddim_to(z_mid, x2, a_mid, a_end)
    return student_x_target(z, z_end, a_t, a_end), z_end


def student_x_target(z, z_end, a_t, a_end):
    """The x whose one DDIM step from ``z`` (alpha-bar ``a_t``) lands on ``z_end`` (alpha-bar ``a_end``)."""
    at, ae = _bcast(a_t, z), _bcast(a_end, z)
    ratio = jnp.sqrt(1.0 - ae) / jnp.sqrt(1.0 - at)
    return (_f32(z_end) - ratio * _f32(z)) / (jnp.sqrt(ae) - ratio * jnp.sqrt(at))


def snr_weight(a, weighting: str = "truncated_snr"):
    """The loss weight on the x-prediction error at alpha-bar ``a``: ``max(SNR, 1)`` (``"truncated_snr"``) or
    ``SNR + 1`` (``"snr_plus_one"``, the v-prediction loss), SNR = a / (1 - a)."""
    _check_choice("weighting", weighting, WEIGHTINGS)
    a = _f32(a)
    snr = a / (1.0 - a)
    return jnp.maximum(snr, 1.0) if weighting == "truncated_snr" else snr + 1.0


# ---------------------------------------------------------------------------------------------
# Consistency distillation.


def consistency_grid(num_timesteps: int, num_points: int) -> np.ndarray:
    """The N discretisation points of consistency distillation, increasing: ``round(linspace(0, T - 1, N))``
    (the boundary t_min = 0 first, T - 1 last)."""
    if not isinstance(num_points, (int, np.integer)) or isinstance(num_points, bool) or num_points < 2:
        raise ValueError(f"num_points must be an integer >= 2; got {num_points!r}")
    return make_timesteps(num_timesteps, num_points, "linspace")


def consistency_coefficients(t, *, t_min=0, sigma_data: float = 0.5, scaling: float = 10.0):
    """``(c_skip, c_out)`` at timesteps ``t`` (see the module's doc); exactly ``(1, 0)`` at ``t = t_min``."""
    s = jnp.float32(scaling) * (_f32(t) - jnp.float32(t_min))
    sd2 = jnp.float32(sigma_data) ** 2
    return sd2 / (s * s + sd2), s / jnp.sqrt(s * s + sd2)


def consistency_output(x, x0_pred, t, **coefficients):
    """``f(x, t) = c_skip(t) x + c_out(t) x0_pred`` (``t`` scalar or ``[B]``; ``coefficients``: those of
    :func:`consistency_coefficients`)."""
    c_skip, c_out = consistency_coefficients(t, **coefficients)
    x = _f32(x)
    return _bcast(c_skip, x) * x + _bcast(c_out, x) * _f32(x0_pred)


def teacher_step_2m(x0_fn, x_far, t_far, t_near, t_to, a_far, a_near, a_to):
    """``(x_near, x_to)``: from ``x_far`` at ``t_far`` a DDIM step to ``t_near``, then DPM-Solver++ (2M)'s step
    to ``t_to`` with the teacher's x0-predictions at ``t_near`` (D1) and ``t_far`` (D0):
    ``x_to = (sigma_to / sigma_near) x_near - alpha_to (e^-h - 1) ((1 + 1/(2r)) D1 - 1/(2r) D0)``,
    ``h = lambda_to - lambda_near``, ``r = (lambda_near - lambda_far) / h``, ``lambda = log(alpha / sigma)``."""
    x_far = _f32(x_far)
    d0 = _f32(x0_fn(x_far, t_far))
    x_near = ddim_to(x_far, d0, a_far, a_near)
    d1 = _f32(x0_fn(x_near, t_near))
    lam = lambda a: 0.5 * (jnp.log(a) - jnp.log1p(-a))  # noqa: E731
    af, an, at = (_bcast(v, x_far) for v in (a_far, a_near, a_to))
    h = lam(at) - lam(an)
    r = (lam(an) - lam(af)) / h
    d = (1.0 + 0.5 / r) * d1 - (0.5 / r) * d0
    x_to = jnp.sqrt(1.0 - at) / jnp.sqrt(1.0 - an) * x_near - jnp.sqrt(at) * jnp.expm1(-h) * d
    return x_near, x_to


def metric(a, b, name: str = "l2"):
    """Per-example distance of ``[B, ...]`` arrays: ``"l2"`` the mean squared difference, ``"pseudo_huber"``
    ``sqrt(||a - b||^2 + c^2) - c`` with ``c = 0.00054 sqrt(dim)`` (improved consistency training's)."""
    _check_choice("metric", name, METRICS)
    diff = (_f32(a) - _f32(b)).reshape(a.shape[0], -1)
    sq = jnp.sum(diff * diff, axis=1)
    if name == "l2":
        return sq / diff.shape[1]
    c = jnp.float32(0.00054 * np.sqrt(diff.shape[1]))
    return jnp.sqrt(sq + c * c) - c


# ---------------------------------------------------------------------------------------------
# Consistency models' multistep sampling.


@functools.partial(jax.jit, static_argnames=("clip_x0",))
def _consistency_scan(f_fn, x_T, ts, a_s, key, *, clip_x0):
    def denoise(x, t):
        out = f_fn(x, jnp.full((x.shape[0],), t, jnp.int32)).astype(jnp.float32)
        return out if clip_x0 is None else jnp.clip(out, -clip_x0, clip_x0)

    x = denoise(x_T.astype(jnp.float32), ts[0])

    def body(x, inp):
        i, t, a = inp
        z = jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
        return denoise(jnp.sqrt(a) * x + jnp.sqrt(1.0 - a) * z, t), None

    x, _ = jax.lax.scan(body, x, (jnp.arange(1, ts.shape[0], dtype=jnp.int32), ts[1:], a_s[1:]))
    return x.astype(x_T.dtype)


def consistency_sample(f_fn, schedule: Schedule, x_T, timesteps, key=None, *, clip_x0: float | None = None):
    """A consistency model's samples: ``x = f(x_T, tau_S)``, then for each next (lower) timestep tau of
    ``timesteps`` (increasing, as :func:`ddim_jax.schedules.make_timesteps` gives them) the sample is noised to
    tau and denoised again, ``x = f(sqrt(a) x + sqrt(1 - a) z, tau)``, z drawn from ``fold_in(key, i)`` at step i.
    ``f_fn(x, t)``: the consistency function (a model with x0 output). One timestep is one-step sampling
    (``key`` unused)."""
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a ddim_jax.Schedule; got {type(schedule).__name__}")
    tau = np.asarray(timesteps)
    T = schedule.num_timesteps
    if (tau.ndim != 1 or tau.size < 1 or not np.issubdtype(tau.dtype, np.integer) or np.any(np.diff(tau) <= 0)
            or tau[0] < 0 or tau[-1] > T - 1):
        raise ValueError(f"timesteps must be a non-empty 1-D strictly increasing integer array in [0, {T - 1}]; "
                         f"got {timesteps!r}")
    if tau.size > 1 and key is None:
        raise ValueError("key (a jax.random key) is required for multistep consistency sampling (it re-noises)")
    f_fn = f_fn if isinstance(f_fn, jax.tree_util.Partial) else jax.tree_util.Partial(f_fn)
    ts = np.ascontiguousarray(tau[::-1].astype(np.int32))
    return _consistency_scan(f_fn, x_T, ts, schedule.alpha_bar(ts), jax.random.key(0) if key is None else key,
                             clip_x0=None if clip_x0 is None else float(clip_x0))


__all__ = ["METHODS", "METRICS", "ODE_SOLVERS", "SAMPLE_SPACING", "WEIGHTINGS", "consistency_coefficients",
           "consistency_grid", "consistency_output", "consistency_sample", "ddim_to", "metric", "progressive_grid",
           "progressive_target", "snr_weight", "student_x_target", "teacher_step_2m"]
