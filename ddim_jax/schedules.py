"""Noise schedules and timestep sub-sequences (tau).

Conventions used throughout the package:

* Model timesteps are 0-indexed, ``t in [0, T - 1]``, as in the paper's code.
* ``Schedule.alphas_cumprod[t]`` is the paper's ``alpha_{t+1}`` (DDPM's alpha-bar):
  ``prod_{s <= t} (1 - beta_s)``.
* The step after the last one lands on ``x_0``, whose alpha-bar is exactly 1 (the paper's
  ``a_0 = 1`` convention). :meth:`Schedule.alpha_bar` maps ``t = -1`` to that 1.
* Tables are float32 (computed in float64 first), whatever dtype the model runs in.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

SCHEDULES = ("linear", "quadratic", "scaled_linear", "cosine", "sigmoid")
# The longest schedule (its float64 tables are computed on the host; published models use 1000 to 4000 steps).
MAX_TIMESTEPS = 100_000
SPACINGS = ("uniform", "quadratic", "leading", "trailing", "linspace", "karras", "exponential")
# Spacings placed by the schedule's noise levels, so make_timesteps needs ``schedule=`` for them.
SIGMA_SPACINGS = ("karras", "exponential")

_DEFAULT_BETAS = {
    "linear": (1e-4, 0.02),
    "quadratic": (1e-4, 0.02),
    "scaled_linear": (0.00085, 0.012),
    "sigmoid": (1e-4, 0.02),
}


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """A discrete-time variance schedule: ``betas`` of shape ``[T]`` (float32, in (0, 1])."""

    betas: np.ndarray

    def __post_init__(self):
        betas = np.asarray(self.betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size < 1:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not np.all(np.isfinite(betas)) or np.any(betas <= 0) or np.any(betas > 1):
            raise ValueError("betas must be finite and in (0, 1]")
        object.__setattr__(self, "_betas64", betas)
        object.__setattr__(self, "betas", betas.astype(np.float32))
        ac = np.cumprod(1.0 - betas)
        object.__setattr__(self, "alphas_cumprod", ac.astype(np.float32))
        # Index t + 1; entry 0 is the alpha-bar of x_0, exactly 1.
        object.__setattr__(self, "_alpha_bar_table", np.concatenate([[1.0], ac]).astype(np.float32))

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def zero_terminal_snr(self) -> bool:
        return bool(self.alphas_cumprod[-1] == 0.0)

    def alpha_bar(self, t):
        """alpha-bar at 0-indexed timesteps ``t`` (numpy or jax int array); ``t = -1`` gives 1."""
        if isinstance(t, np.ndarray) or np.isscalar(t):
            return self._alpha_bar_table[np.asarray(t) + 1]
        import jax.numpy as jnp

        return jnp.asarray(self._alpha_bar_table)[t + 1]

    def __repr__(self):
        return (f"Schedule(T={self.num_timesteps}, beta[0]={self.betas[0]:.3g}, "
                f"beta[-1]={self.betas[-1]:.3g}, alpha_bar[-1]={self.alphas_cumprod[-1]:.3g})")


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _check_int(name: str, value, minimum: int = 1, maximum: int | None = None) -> int:
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum
            or (maximum is not None and value > maximum)):
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{name} must be an integer {bound}; got {value!r}")
    return int(value)


def make_schedule(
    name: str = "linear",
    num_timesteps: int = 1000,
    *,
    beta_start: float | None = None,
    beta_end: float | None = None,
    betas=None,
    rescale_zero_terminal_snr: bool = False,
) -> Schedule:
    """Builds a :class:`Schedule`.

    ``name`` is one of:

    * ``"linear"``: betas linearly spaced from ``beta_start`` to ``beta_end`` (DDPM: 1e-4 .. 0.02).
    * ``"quadratic"``: ``linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2`` (the paper's code, "quad").
    * ``"scaled_linear"``: the same formula with Stable Diffusion's defaults 0.00085 .. 0.012.
    * ``"cosine"``: Nichol & Dhariwal's ``alpha_bar(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2)``,
      ``s = 0.008``, betas capped at 0.999.
    * ``"sigmoid"``: ``sigmoid(linspace(-6, 6, T)) * (beta_end - beta_start) + beta_start`` (the paper's code).
    * ``"custom"``: the given ``betas``.

    ``rescale_zero_terminal_snr`` applies Lin et al. (2024), Algorithm 1: alpha-bar at ``T - 1``
    becomes exactly 0. Such a schedule needs a model that predicts v or x0; the samplers refuse
    epsilon prediction with it (x0 = (x - sqrt(1 - a) eps) / sqrt(a) divides by zero there).
    """
    if betas is not None:
        if name not in ("linear", "custom"):
            raise ValueError(f"name must be 'custom' when betas are given; got {name!r}")
        b = np.asarray(betas, dtype=np.float64)
    else:
        _check_choice("name", name, SCHEDULES)
        T = _check_int("num_timesteps", num_timesteps, maximum=MAX_TIMESTEPS)
        if name == "cosine":
            if beta_start is not None or beta_end is not None:
                raise ValueError("beta_start and beta_end do not apply to the 'cosine' schedule")
            s = 0.008
            f = lambda u: np.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2
            t = np.arange(T, dtype=np.float64)
            b = np.minimum(1.0 - f(t + 1) / f(t), 0.999)
        else:
            lo, hi = _DEFAULT_BETAS[name]
            lo = lo if beta_start is None else float(beta_start)
            hi = hi if beta_end is None else float(beta_end)
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"beta_start and beta_end must satisfy 0 < beta_start <= beta_end <= 1; "
                                 f"got {lo}, {hi}")
            if name == "linear":
                b = np.linspace(lo, hi, T, dtype=np.float64)
            elif name in ("quadratic", "scaled_linear"):
                b = np.linspace(lo ** 0.5, hi ** 0.5, T, dtype=np.float64) ** 2
            else:  # sigmoid
                b = 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, T))) * (hi - lo) + lo
    if rescale_zero_terminal_snr:
        b = _rescale_zero_terminal_snr(b)
    return Schedule(b)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shifts and scales sqrt(alpha-bar) so its last entry is 0 and its first is unchanged."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.size < 2:
        raise ValueError("rescale_zero_terminal_snr needs num_timesteps >= 2")
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab ** 2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


def _distinct_increasing(tau: np.ndarray, T: int) -> np.ndarray:
    """Makes a non-decreasing int sequence of length S <= T strictly increasing inside [0, T - 1].

    Each repeat moves up to the previous entry + 1 (``tau[k] = max(tau[k], tau[k-1] + 1)``); if that
    would push an entry past the room left for the ones after it, it is capped there instead
    (``tau[k] <= T - S + k``). Entries that are already distinct and in range are kept.
    """
    i = np.arange(tau.shape[0], dtype=np.int64)
    return np.minimum(np.maximum.accumulate(np.maximum(tau, 0) - i), T - tau.shape[0]) + i


def _sigma_timesteps(schedule: Schedule, S: int, spacing: str) -> np.ndarray:
    """Fractional timesteps (increasing) of Karras / exponential sigmas, as diffusers computes them."""
    T = schedule.num_timesteps
    ab = schedule.alphas_cumprod.astype(np.float64)
    if ab[-1] == 0.0:  # zero terminal SNR: diffusers' DPMSolverMultistepScheduler uses 2**-24 there
        ab = np.concatenate([ab[:-1], [2.0 ** -24]])
    if np.any(ab <= 0.0):
        raise ValueError(f"spacing {spacing!r} needs alpha-bar > 0 before the last timestep")
    log_sigmas = 0.5 * np.log((1.0 - ab) / ab)
    if T > 1 and not np.all(np.diff(log_sigmas) > 0):
        raise ValueError(f"spacing {spacing!r} needs a strictly increasing sigma = sqrt((1 - a) / a)")
    lo, hi = log_sigmas[0], log_sigmas[-1]
    u = np.linspace(0.0, 1.0, S)  # diffusers' ramp, from sigma_max (u = 0) down to sigma_min; S = 1: sigma_max
    if spacing == "karras":
        rho = 7.0
        s_min, s_max = math.exp(lo) ** (1 / rho), math.exp(hi) ** (1 / rho)
        log_sigma = rho * np.log(s_max + u * (s_min - s_max))
    else:  # exponential
        log_sigma = hi * (1.0 - u) + lo * u  # exact at both ends (the floor below needs that)
    log_sigma = log_sigma[::-1]  # increasing, like tau
    if T == 1:
        return np.zeros(S)
    # diffusers' _sigma_to_t: linear interpolation of t in log sigma, clamped to [0, T - 1].
    return np.interp(log_sigma, log_sigmas, np.arange(T, dtype=np.float64))


def make_timesteps(num_timesteps: int, num_steps: int, spacing: str = "uniform", *,
                   schedule: Schedule | None = None) -> np.ndarray:
    """The sub-sequence tau: ``num_steps`` distinct increasing int32 timesteps in ``[0, T - 1]``.

    With T = ``num_timesteps`` and S = ``num_steps`` (1 <= S <= T), ``i = 0 .. S - 1``:

    * ``"uniform"`` (paper, Appendix D.2, "linear"): ``floor(i * T / S)``. Equals the paper's code
      ``range(0, T, T // S)`` when S divides T; when it does not, that code yields more than S
      steps, this yields exactly S, evenly spread.
    * ``"quadratic"`` (paper): ``floor(i^2 * 0.8 T / (S - 1)^2)``, i.e. the paper's code
      ``linspace(0, sqrt(0.8 T), S) ** 2``, so the first step is at t = 0.8 T as in the paper's
      Table 1. The paper's code repeats t = 0 (and other small t) for large S, wasting model calls;
      here each repeat is moved up to the previous entry + 1, so the steps stay distinct (the
      largest stays <= max(S - 1, 0.8 T) <= T - 1).
    * ``"leading"`` (diffusers): ``i * (T // S)``; the largest step is (S - 1) * (T // S), never T - 1
      unless S = T.
    * ``"trailing"`` (diffusers): ``round(T - j * T / S) - 1`` for ``j = S - 1 .. 0``; always starts
      at T - 1 (the choice for zero-terminal-SNR schedules).
    * ``"linspace"`` (diffusers): ``round(linspace(0, T - 1, S))``; starts at T - 1.
    * ``"karras"`` (Karras et al. 2022; diffusers' ``use_karras_sigmas=True``): needs ``schedule``.
      With ``sigma(t) = sqrt((1 - abar_t) / abar_t)``, the S sigmas
      ``(sigma_min^(1/7) + i / (S - 1) * (sigma_max^(1/7) - sigma_min^(1/7)))^7`` between
      ``sigma_min = sigma(0)`` and ``sigma_max = sigma(T - 1)``, each mapped to a fractional t by
      linear interpolation in log sigma, then rounded; tau runs from 0 to T - 1 (S = 1: [T - 1],
      sigma_max, as in diffusers).
    * ``"exponential"`` (diffusers' ``use_exponential_sigmas=True``): needs ``schedule``. S sigmas
      uniform in log sigma between the same ends, mapped the same way, but the fractional t is
      truncated (floor), not rounded, as diffusers does (it only rounds its Karras timesteps).

    For ``"karras"`` and ``"exponential"`` a zero-terminal-SNR schedule uses alpha-bar 2^-24 at
    T - 1 (as diffusers does), so sigma_max is finite. Both crowd steps near t = 0, so for large S
    several sigmas land on the same t (e.g. T = 1000: karras from S = 100, exponential from
    S = 50; with zero terminal SNR also at the top, below the huge sigma_max). diffusers keeps those
    duplicates (repeated model calls at one t); here, as for ``"quadratic"``, each repeat moves up
    to the previous entry + 1, capped so the later steps still fit below T (repeats of T - 1 become
    ..., T - 2, T - 1), so tau is S distinct steps. Where diffusers has no duplicates tau equals
    its timesteps, except that its exponential top step can be T - 2: it truncates a float32
    round-off below T - 1 at sigma_max, while here sigma_max maps to exactly T - 1.

    Sampling visits tau from its last entry down to its first, then lands on x_0.
    """
    T = _check_int("num_timesteps", num_timesteps)
    S = _check_int("num_steps", num_steps)
    _check_choice("spacing", spacing, SPACINGS)
    if S > T:
        raise ValueError(f"num_steps must be <= num_timesteps ({T}); got {S}")
    if schedule is not None:
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a ddim_jax.Schedule; got {type(schedule).__name__}")
        if schedule.num_timesteps != T:
            raise ValueError(f"schedule has {schedule.num_timesteps} timesteps but num_timesteps is {T}")
    elif spacing in SIGMA_SPACINGS:
        raise ValueError(f"spacing {spacing!r} is placed by the schedule's noise levels: "
                         f"pass schedule=, e.g. make_timesteps(T, S, {spacing!r}, schedule=schedule)")
    i = np.arange(S, dtype=np.int64)
    if spacing == "uniform":
        tau = (i * T) // S
    elif spacing == "quadratic":
        if S == 1:
            tau = np.zeros(1, dtype=np.int64)
        else:
            tau = np.floor(np.linspace(0.0, math.sqrt(0.8 * T), S) ** 2).astype(np.int64)
            tau = np.maximum.accumulate(tau - i) + i  # tau[k] = max(tau[k], tau[k-1] + 1)
    elif spacing == "leading":
        tau = i * (T // S)
    elif spacing == "trailing":
        tau = (np.round(T - i * (T / S)).astype(np.int64) - 1)[::-1]
    elif spacing == "linspace":
        tau = np.round(np.linspace(0, T - 1, S)).astype(np.int64)
    else:  # karras, exponential: diffusers rounds the Karras t, truncates the exponential t
        t = _sigma_timesteps(schedule, S, spacing)
        tau = (np.round(t) if spacing == "karras" else np.floor(t)).astype(np.int64)
        # diffusers would keep repeated steps here; keep the contract instead (see the docstring).
        tau = _distinct_increasing(tau, T)
    tau = np.ascontiguousarray(tau, dtype=np.int32)
    assert tau.shape == (S,) and tau[0] >= 0 and tau[-1] <= T - 1 and np.all(np.diff(tau) > 0), tau
    return tau
