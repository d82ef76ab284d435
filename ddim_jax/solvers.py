"""One sampling entry point for DDIM, the DPM-Solver++ multistep solvers (Lu et al. 2022), UniPC (Zhao et
al. 2023) and PLMS.

``sample(eps_fn, schedule, x_T, num_steps, solver=...)`` with ``solver`` in :data:`SOLVERS`:

* ``"ddim"``: :func:`ddim_jax.sampling.ddim_sample` itself (eta, key, clipping passed through).
* ``"dpmpp_2m"``, ``"dpmpp_3m"``: DPM-Solver++ multistep of order 2 and 3, data-prediction form,
  deterministic (there is no eta).
* ``"dpmpp_2m_sde"``: SDE-DPM-Solver++(2M), midpoint, data-prediction form (diffusers'
  ``algorithm_type="sde-dpmsolver++"``, ``solver_order=2``); stochastic, needs ``key``.
* ``"unipc"``: UniPC with B(h) = expm1(-h) ("bh2") and a second-order predictor, data-prediction form
  (diffusers' ``UniPCMultistepScheduler`` defaults); deterministic, one model call per step.
* ``"plms"``: PNDM's pseudo linear multistep (Liu et al. 2022) as diffusers' ``PNDMScheduler`` with
  ``skip_prk_steps=True`` runs it; deterministic, S + 1 model calls (see below).

eta (and sigma_hat) are DDIM's only; every other solver requires ``eta = 0``.

Notation, in the discrete-time DDPM parameterisation: ``alpha = sqrt(abar)``, ``sigma = sqrt(1 - abar)``,
log-SNR ``lambda = log(alpha) - log(sigma)``. A step goes from the current timestep s (the model is
called at ``(x_s, s)`` and its output converted to the data prediction ``m0 = x0(x_s, s)``, then
clipped/thresholded if asked) to the next one t, ``h = lambda_t - lambda_s``. ``m1``, ``m2`` are
the data predictions of the previous two steps, at log-SNRs ``lambda_1``, ``lambda_2``;
``h_0 = lambda_s - lambda_1``, ``h_1 = lambda_1 - lambda_2``, ``r0 = h_0 / h``, ``r1 = h_1 / h``.

* order 1 (= DDIM, eta = 0): ``x_t = (sigma_t / sigma_s) x_s - alpha_t expm1(-h) m0``
* order 2 (midpoint, diffusers' ``solver_type="midpoint"``): the order-1 update
  ``- 0.5 alpha_t expm1(-h) D1`` with ``D1 = (m0 - m1) / r0``
* order 3: the order-1 update ``+ alpha_t (expm1(-h) / h + 1) D1
  - alpha_t ((expm1(-h) + h) / h^2 - 1/2) D2`` with ``D1_0 = (m0 - m1) / r0``,
  ``D1_1 = (m1 - m2) / r1``, ``D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1)``,
  ``D2 = (D1_0 - D1_1) / (r0 + r1)``.

Order per step, as diffusers' ``DPMSolverMultistepScheduler`` chooses it with
``lower_order_final=True`` and ``final_sigmas_type="zero"`` (step i = 0 .. S - 1): order 1 at the first
step (no history) and at the last step (it lands on x_0); for 3M, order 2 at step 1, and also at
step S - 2 when S < 15; the solver's own order everywhere else. With the same betas, the same model
and ``timesteps=scheduler.timesteps[::-1]`` the samples agree with that scheduler to float32
round-off (tests/test_solvers.py).

Conventions are :func:`ddim_sample`'s: tau is increasing (``make_timesteps`` or ``timesteps=``) and
is visited from its last entry down; the step after tau_1 lands on x_0, alpha-bar exactly 1, where
``sigma = 0`` and ``lambda = +inf``. That step is always order 1, and with ``h = inf``,
``expm1(-h) = -1`` and ``sigma_t / sigma_s = 0`` it returns the data prediction at tau_1 exactly
(no NaN: the higher-order branches, computed at every step and selected by the step's order, get
finite placeholder step ratios where they are not used). A zero-terminal-SNR start (``abar = 0``,
``lambda = -inf``, needs ``prediction_type="v"``) is handled the same way: the first step's ``h``
is +inf, and later steps give the history point at ``lambda = -inf`` zero weight (``r = inf``);
diffusers instead replaces that alpha-bar by 2^-24.

2M SDE (same notation and per-step orders as 2M; z_i a standard normal draw):

* order 1: ``x_t = (sigma_t / sigma_s) e^-h x_s - alpha_t expm1(-2h) m0 + sigma_t sqrt(-expm1(-2h)) z_i``
* order 2: the order-1 update ``- 0.5 alpha_t expm1(-2h) D1``, ``D1 = (m0 - m1) / r0``

i.e. the 2M update with ``expm1(-h)`` replaced by ``expm1(-2h)``, the x coefficient multiplied by
``e^-h``, plus noise. Step i (0 = the first step, at tau_S) draws ``z_i = normal(fold_in(key, i),
x.shape, float32)``, as :func:`ddim_sample` does, so the sample does not depend on how the batch is
sharded. The last step (onto x_0, h = +inf, sigma_t = 0) adds no noise and returns the data
prediction, as in the ODE case. Handing diffusers' ``step(..., variance_noise=z_i)`` the same z_i gives
the same samples to float32 round-off (diffusers computes ``1 - exp(-2h)``, we ``-expm1(-2h)``).

UniPC: its predictor UniP-2 with B(h) = expm1(-h) is exactly the 2M update above (its rho = 1/2 and
``D1 = (m0 - m1) / r0``), with the same per-step orders. Its corrector UniC runs after each model
call but the first: the call at ``(x_s, s)`` gives ``m0``, which corrects x_s itself, from the sample
``x_1`` the previous step started at (log-SNR ``lambda_1``, data prediction ``m1``;
``h = lambda_s - lambda_1``):

* ``x_s <- (sigma_s / sigma_1) x_1 - alpha_s expm1(-h) (m1 + rho_0 (m2 - m1) / r + rho_1 (m0 - m1))``

with the order of the previous step: order 1 takes ``rho_0 = 0``, ``rho_1 = 1/2``; order 2 takes
``r = (lambda_2 - lambda_1) / h`` and solves ``[[1, 1], [r, 1]] (rho_0, rho_1) = (b_0, b_1)``,
``b_0 = (expm1(-h) / -h - 1) / expm1(-h)``, ``b_1 = 2 ((expm1(-h) / -h - 1) / -h - 1/2) / expm1(-h)``.
The predictor then starts from the corrected x_s; ``m0`` is not recomputed there, so UniPC costs
no more calls than 2M, and it converges with order 3 (tests/test_solvers.py). Passing diffusers'
``timesteps[::-1]`` as ``timesteps=`` gives its samples to float32 round-off.

PLMS works on eps: each model call's output is converted to ``(x0, eps)`` (x0 clipped/thresholded if
asked, eps then recomputed from it) and the step from s to t is DDIM's (eta = 0) with a combined eps
``E``: ``x_t = sqrt(abar_t) (x_s - sqrt(1 - abar_s) E) / sqrt(abar_s) + sqrt(1 - abar_t) E`` (diffusers'
formula (9), algebraically the same). With ``t_k = tau_{S-k}`` (``t_0 = tau_S``, ``t_S`` = x_0) and
e_k the eps of the k-th model call, S >= 2 takes S + 1 model calls, at ``t_0, t_1, t_1, t_2, ...,
t_{S-1}`` (exactly diffusers' ``timesteps`` list):

* call 0 at ``(x_T, t_0)``: e_0; predictor ``x' = step(x_T, t_0 -> t_1, e_0)``
* call 1 at ``(x', t_1)``: e_1; ``x_1 = step(x_T, t_0 -> t_1, (e_0 + e_1) / 2)`` (Heun; e_1 is then
  discarded, as diffusers does: it is not kept in the history)
* call k >= 2 at ``(x_{k-1}, t_{k-1})``: e_k; ``x_k = step(x_{k-1}, t_{k-1} -> t_k, E)`` with E the
  Adams-Bashforth combination of e_k and the previous stored eps (e_0, e_2, e_3, ...):
  ``(3 e_k - e_0) / 2`` at k = 2, ``(23 e_k - 16 e_{k-1} + 5 e_{k-2}) / 12`` at k = 3 (e_{k-1} = e_2,
  e_{k-2} = e_0), ``(55 e_k - 59 e_{k-1} + 37 e_{k-2} - 9 e_{k-3}) / 24`` from k = 4 on.

S = 1 is one DDIM step (one call). The coefficients are the constant-step Adams-Bashforth ones
whatever the spacing of tau (as in diffusers); on a grid uniform in log-SNR PLMS converges only
like ~h^1.6 on the mixture ODE of the tests (2M: h^2). All of this is one scan of S + 1 iterations
(:func:`plms_plan` builds its per-iteration call timestep, step ends, eps weights and the restart
and push flags, passed as arguments). PLMS cannot start at alpha-bar 0 (zero terminal SNR): the
averaged eps of the restarted first step would be divided by sqrt(alpha-bar) = 0; that raises
ValueError.

Differences from ``PNDMScheduler``: it steps from t to ``t - T // S`` regardless of its timestep list
and its final step lands on ``alphas_cumprod[0]`` unless ``set_alpha_to_one=True``. With
``set_alpha_to_one=True`` and a list uniform with step ``T // S`` (``timestep_spacing="leading"``,
any ``steps_offset``; ``"trailing"`` when S divides T), passing its ``_timesteps`` (increasing, S
distinct values) as ``timesteps=`` gives its samples to float32 round-off (tests/test_solvers.py). Its
``"linspace"`` list has steps ~(T - 1)/(S - 1) != T // S, so its updates land between the listed
timesteps and no tau of ours reproduces it. It has no x0 clipping; ours applies ``clip_x0`` and
``dynamic_threshold`` to each call's x0 as above (PLMS's last step uses the combined eps, so its
output is not itself a clipped x0 and can leave [-clip_x0, clip_x0] slightly).

The 3M update is the one of the original DPM-Solver code, which diffusers uses (parity needs it).
Its D2 is ``~ h^2 x0''/2`` while its weight ``-alpha_t phi_3``, ``phi_3 = (e^-h - 1 + h)/h^2 - 1/2``, is
half of the Taylor term's, so 3M is globally second order with a small constant: it is more
accurate than 2M and its error falls faster than h^2 at practical step counts (slope ~3 from 10 to
40 steps in tests/test_solvers.py), tending to h^2 as S grows.

Other differences from ``DPMSolverMultistepScheduler``: its ``"linspace"`` and ``"leading"`` spacings
take S + 1 points and drop t = 0, so they are not ours (nor DDIMScheduler's); pass its
``timesteps[::-1]`` as ``timesteps=``. Its ``"trailing"`` is ours. Its ``thresholding`` caps the
dynamic threshold at ``sample_max_value`` (1 by default, i.e. clipping to [-1, 1]); our
``dynamic_threshold`` is Imagen's, uncapped, as in :func:`ddim_sample`.

The whole DPM-Solver++ sampler is one ``jax.lax.scan`` in one jitted function; the previous data
predictions and their log-SNRs live in the scan carry. The alpha-bars and the per-step orders are
arguments (each step computes the three updates and selects by its order: a few elementwise
operations, nothing next to a model call), so another tau of the same length, and the other
DPM-Solver++ order, reuse the compiled program: it is compiled once per (eps_fn, shapes, S,
prediction_type, clip_x0, dynamic_threshold). The SDE variant is a second program of the same
function (a static flag: it takes the key and draws noise); new keys do not recompile; so is UniPC (a
static flag adds the corrector). PLMS is its
own scan, compiled once per (eps_fn, shapes, S, prediction_type, clip_x0, dynamic_threshold).
Arithmetic is float32; x is carried (and fed to the model) in x_T's dtype.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax.diffusion import predict_x0_eps
from ddim_jax.sampling import (
    _check_eta,
    _check_thresholds,
    _decoding_steps,
    _model,
    _prepare,
    ddim_sample,
    threshold_x0,
)
from ddim_jax.schedules import Schedule, _check_choice

def step_orders(num_steps: int, solver_order: int) -> np.ndarray:
    """The order of each of the ``num_steps`` DPM-Solver++ steps (first step first), int32.

    diffusers' rule (``lower_order_final=True``, ``final_sigmas_type="zero"``): order 1 at the first and
    the last step; at most 2 at the second step, and at the second-to-last when ``num_steps < 15``.
    """
    S = int(num_steps)
    orders = np.full(S, solver_order, np.int32)
    if solver_order >= 3:
        orders[1:2] = 2
        if S < 15:
            orders[-2:] = np.minimum(orders[-2:], 2)
    orders[0] = orders[-1] = 1
    return orders


def _log_snr(a):
    """lambda = log(sqrt(a)) - log(sqrt(1 - a)): +inf at a = 1, -inf at a = 0, never NaN."""
    return jnp.log(jnp.sqrt(a)) - jnp.log(jnp.sqrt(1.0 - a))


def _unic(x_last, a_last, as_, m0, m1, m2, lam_s, l1, l2, order):
    """UniPC's corrector (UniC, B(h) = expm1(-h), data prediction) of the sample at s: from ``x_last`` at
    the previous timestep (alpha-bar ``a_last``, data prediction ``m1``, log-SNR ``l1``) to s again, with
    the new data prediction ``m0`` at s; order 2 also uses ``m2`` at ``l2``. ``order`` 0 = no correction."""
    alpha_s, sigma_s, sigma_1 = jnp.sqrt(as_), jnp.sqrt(1.0 - as_), jnp.sqrt(1.0 - a_last)
    h = jnp.where(order >= 1, lam_s - l1, 1.0)
    em = jnp.expm1(-h)
    b0 = (em / -h - 1.0) / em  # phi_2 / B(h) and 2 phi_3 / B(h) in UniPC's notation
    b1 = 2.0 * ((em / -h - 1.0) / -h - 0.5) / em
    # The older point's ratio (negative; r = 1 is s itself). Unused at order 1, where it is a finite
    # placeholder (h = +inf after a zero-terminal-SNR start); a point at lambda = -inf gets rk = -inf, weight 0.
    rk = jnp.where(order >= 2, (l2 - l1) / h, -1.0)
    rho0 = (b0 - b1) / (1.0 - rk)  # solves [[1, 1], [rk, 1]] (rho0, rho1) = (b0, b1)
    rho1 = jnp.where(order >= 2, b0 - rho0, 0.5)  # order 1: UniPC's fixed 1/2
    D1 = jnp.where(order >= 2, rho0 * (m2 - m1) / rk, 0.0)
    x_c = (sigma_s / sigma_1) * x_last - (alpha_s * em) * (m1 + D1 + rho1 * (m0 - m1))
    return jnp.where(order >= 1, x_c, x_last)


@functools.partial(jax.jit, static_argnames=("sde", "corrector", "prediction_type", "clip_x0", "dynamic_threshold"))
def _dpmpp_scan(eps_fn, x_T, ts, a_s, a_t, orders, key, *, sde, corrector, prediction_type, clip_x0,
                dynamic_threshold):
    def body(carry, inp):
        x, m1, m2, l1, l2, x_last, a_last = carry
        i, t, as_, at, order, c_order = inp
        m0, _ = predict_x0_eps(_model(eps_fn, x, t), x, as_, prediction_type)
        if clip_x0 is not None or dynamic_threshold is not None:
            m0 = threshold_x0(m0, clip_x0=clip_x0, dynamic_threshold=dynamic_threshold)
        alpha_t, sigma_s, sigma_t = jnp.sqrt(at), jnp.sqrt(1.0 - as_), jnp.sqrt(1.0 - at)
        lam_s = _log_snr(as_)
        if corrector:  # UniPC: correct x_s with the model output just computed there (no extra call)
            x = jnp.where(c_order >= 1, _unic(x_last, a_last, as_, m0, m1, m2, lam_s, l1, l2, c_order),
                          x.astype(jnp.float32))
        h = _log_snr(at) - lam_s
        em = jnp.expm1(-h)  # exp(-h) - 1: -1 at h = +inf (the step onto x_0)
        # Order 1; sigma_t / sigma_s and alpha_t * em are finite even at sigma_t = 0 or alpha_s = 0.
        x1 = (sigma_t / sigma_s) * x.astype(jnp.float32) - (alpha_t * em) * m0
        # Orders 2 and 3. Where a branch is not selected its step ratios are replaced by 1, so it stays
        # finite (h = +inf on the last step, no history on the first ones). A history point at
        # lambda = -inf (a zero-terminal-SNR start) has r = +inf and so weight 0.
        hh = jnp.where(order >= 2, h, 1.0)
        r0 = jnp.where(order >= 2, lam_s - l1, 1.0) / hh
        D1_0 = (m0 - m1) / r0
        x2 = x1 - (0.5 * alpha_t * em) * D1_0
        if sde:  # SDE-DPM-Solver++: em -> expm1(-2h), the x coefficient gains exp(-h), plus fresh noise
            em2 = jnp.expm1(-2.0 * h)  # -1 at h = +inf
            z = jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
            x1 = ((sigma_t / sigma_s) * jnp.exp(-h)) * x.astype(jnp.float32) - (alpha_t * em2) * m0 \
                + (sigma_t * jnp.sqrt(-em2)) * z
            x2 = x1 - (0.5 * alpha_t * em2) * D1_0
        r0, r1 = jnp.where(order >= 3, r0, 1.0), jnp.where(order >= 3, l1 - l2, 1.0) / hh
        D1_1 = (m1 - m2) / r1
        D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
        D2 = (D1_0 - D1_1) / (r0 + r1)
        x3 = x1 + (alpha_t * (em / hh + 1.0)) * D1 - (alpha_t * ((em + hh) / hh**2 - 0.5)) * D2
        x_next = jnp.where(order >= 3, x3, jnp.where(order == 2, x2, x1))
        if corrector:  # the corrected x_s and its alpha-bar: the next correction starts there
            x_last, a_last = x.astype(jnp.float32), as_
        return (x_next.astype(x_T.dtype), m0, m1, lam_s, l1, x_last, a_last), None

    zeros = jnp.zeros(x_T.shape, jnp.float32)
    init = (x_T, zeros, zeros, jnp.float32(0.0), jnp.float32(0.0), zeros, jnp.float32(0.5))
    steps = jnp.arange(ts.shape[0], dtype=jnp.int32)
    c_orders = jnp.concatenate([jnp.zeros(1, orders.dtype), orders[:-1]])  # UniC's order: the last step's
    (x0, *_), _ = jax.lax.scan(body, init, (steps, ts, a_s, a_t, orders, c_orders))
    return x0


_AB = np.array([[1, 0, 0, 0], [3 / 2, -1 / 2, 0, 0], [23 / 12, -16 / 12, 5 / 12, 0],
                [55 / 24, -59 / 24, 37 / 24, -9 / 24]])  # Adams-Bashforth weights of e_new, e_1, e_2, e_3


def plms_plan(tau) -> dict:
    """The PLMS iterations over the increasing ``tau``, first iteration first, as host arrays.

    One model call per iteration, at ``t_call``; the update then takes ``x`` (or, with ``restart``,
    the x the previous iteration started from) from ``t_from`` to ``t_to`` (-1: x_0, alpha-bar 1)
    with the eps combination ``weights @ (e_new, e_1, e_2, e_3)``, ``e_1`` the most recent stored
    eps; ``push`` stores ``e_new``. S = 1: one DDIM step. S >= 2: S + 1 iterations (see the
    module docstring).
    """
    ts, nxt = (a.astype(np.int32) for a in _decoding_steps(tau))
    S = len(ts)
    if S == 1:
        return dict(t_call=ts, t_from=ts, t_to=nxt, weights=_AB[:1].astype(np.float32),
                     restart=np.zeros(1, bool), push=np.ones(1, bool))
    k = np.arange(2, S + 1)
    return dict(
        t_call=np.concatenate([ts[:2], ts[k - 1]]).astype(np.int32),
        t_from=np.concatenate([ts[:1], ts[:1], ts[k - 1]]).astype(np.int32),
        t_to=np.concatenate([ts[1:2], ts[1:2], nxt[k - 1]]).astype(np.int32),
        weights=np.concatenate([_AB[:1], [[0.5, 0.5, 0, 0]], _AB[np.minimum(k, 4) - 1]]).astype(np.float32),
        restart=np.arange(S + 1) == 1, push=np.arange(S + 1) != 1)


@functools.partial(jax.jit, static_argnames=("prediction_type", "clip_x0", "dynamic_threshold"))
def _plms_scan(eps_fn, x_T, t_call, a_call, a_from, a_to, weights, restart, push, *, prediction_type, clip_x0,
               dynamic_threshold):
    def body(carry, inp):
        x, x_start, e1, e2, e3 = carry
        t, ac, af, at, w, rs, ps = inp
        xf = x.astype(jnp.float32)
        m0, e = predict_x0_eps(_model(eps_fn, x, t), x, ac, prediction_type)
        if clip_x0 is not None or dynamic_threshold is not None:
            m0 = threshold_x0(m0, clip_x0=clip_x0, dynamic_threshold=dynamic_threshold)
            e = (xf - jnp.sqrt(ac) * m0) / jnp.sqrt(1.0 - ac)
        ec = w[0] * e + w[1] * e1 + w[2] * e2 + w[3] * e3
        base = jnp.where(rs, x_start, xf)
        x0c = (base - jnp.sqrt(1.0 - af) * ec) / jnp.sqrt(af)
        x_next = jnp.sqrt(at) * x0c + jnp.sqrt(1.0 - at) * ec
        e1, e2, e3 = jnp.where(ps, e, e1), jnp.where(ps, e1, e2), jnp.where(ps, e2, e3)
        return (x_next.astype(x.dtype), xf, e1, e2, e3), None

    zeros = jnp.zeros(x_T.shape, jnp.float32)
    init = (x_T, zeros, zeros, zeros, zeros)
    (x0, *_), _ = jax.lax.scan(body, init, (t_call, a_call, a_from, a_to, weights, restart, push))
    return x0


# ----------------------------------------------------------------------------------------------
# The solvers.


@dataclasses.dataclass(frozen=True)
class Solver:
    """One solver of :func:`sample`: the order of its steps (lowered at the ends, :func:`step_orders`), the
    spacing it uses when none is given, and ``decode(solver, eps_fn, schedule, x_T, tau, key, eta, sigma_hat,
    opts) -> x_0`` over the checked timesteps tau (``opts``: prediction_type, clip_x0, dynamic_threshold)."""

    order: int
    spacing: str
    decode: Callable
    sde: bool = False  # draws noise at every step: needs a key
    corrector: bool = False  # UniPC's corrector after each predictor step


def _ddim(entry, eps_fn, schedule, x_T, tau, key, eta, sigma_hat, opts):
    return ddim_sample(eps_fn, schedule, x_T, timesteps=tau, eta=eta, sigma_hat=sigma_hat, key=key, **opts)


def _multistep(entry, eps_fn, schedule, x_T, tau, key, eta, sigma_hat, opts):
    ts, prev = _decoding_steps(tau)
    return _dpmpp_scan(eps_fn, x_T, ts, schedule.alpha_bar(ts), schedule.alpha_bar(prev),
                       step_orders(len(ts), entry.order), key if entry.sde else None, sde=entry.sde,
                       corrector=entry.corrector, **opts)


def _plms(entry, eps_fn, schedule, x_T, tau, key, eta, sigma_hat, opts):
    if float(schedule.alpha_bar(int(tau[-1]))) == 0.0:
        raise ValueError(f"solver='plms' cannot start at alpha_bar = 0 (t = {int(tau[-1])}, a zero-terminal-SNR "
                         "schedule): its eps combinations divide by sqrt(alpha_bar); use a dpmpp solver or ddim")
    plan = plms_plan(tau)
    ab = schedule.alpha_bar
    return _plms_scan(eps_fn, x_T, plan["t_call"], ab(plan["t_call"]), ab(plan["t_from"]), ab(plan["t_to"]),
                      plan["weights"], plan["restart"], plan["push"], **opts)


# The spacing each solver uses when none is given, chosen on evidence by benchmarks/solver_defaults.py (the
# tables: benchmarks/RESULTS_solvers.md). For each solver, every spacing was measured at 5, 10 and 20 model calls
# on ten exact-oracle problems (five Gaussian mixtures of 2 to 64 dimensions, 3 to 10 components, stds 0.03 to
# 0.4, each under the linear and the cosine schedule; energy distance) and on the digits model (FID). The default
# is the spacing with the lowest worst-case ratio to the best spacing over those cells, among the spacings that
# converge ("quadratic" is excluded: it starts at 0.8 T at every S, where the cosine schedule's alpha-bar is
# 0.093, so x_T ~ N(0, I) is not x_t there and the samples keep a bias that more calls do not remove).
# No spacing is best everywhere for any solver; each default is the least bad in its worst cell. The
# DPM-Solver++ family fails on "uniform" with the linear schedule: its last second-order step (t = 100 -> 0, 3.5
# in log-SNR after steps of 0.75) overshoots (12x DDIM's energy distance at 10 calls on the 8-Gaussian ring).
SOLVER_TABLE = {
    "ddim": Solver(1, "uniform", _ddim),
    "dpmpp_2m": Solver(2, "exponential", _multistep),
    "dpmpp_3m": Solver(3, "trailing", _multistep),
    "dpmpp_2m_sde": Solver(2, "karras", _multistep, sde=True),
    "unipc": Solver(2, "exponential", _multistep, corrector=True),
    "plms": Solver(4, "uniform", _plms),
}
SOLVERS = tuple(SOLVER_TABLE)
DEFAULT_SPACING = {name: entry.spacing for name, entry in SOLVER_TABLE.items()}


def resolve_spacing(solver: str, spacing: str | None) -> str:
    """``spacing``, or the solver's default (:data:`DEFAULT_SPACING`) when it is None."""
    _check_choice("solver", solver, SOLVERS)
    return DEFAULT_SPACING[solver] if spacing is None else spacing


def sample(
    eps_fn,
    schedule: Schedule,
    x_T,
    num_steps: int | None = None,
    *,
    solver: str = "ddim",
    spacing: str | None = None,
    timesteps=None,
    prediction_type: str = "epsilon",
    eta: float = 0.0,
    sigma_hat: bool = False,
    key=None,
    clip_x0: float | None = None,
    dynamic_threshold: float | None = None,
):
    """Decodes ``x_T`` into x_0 with ``solver`` (one of :data:`SOLVERS`) over the sub-sequence tau.

    tau is ``make_timesteps(T, num_steps, spacing)`` or the given increasing ``timesteps`` (give one
    of the two); ``spacing=None`` is the solver's default (:data:`DEFAULT_SPACING`: ``"uniform"`` for
    ddim and plms, ``"exponential"`` for dpmpp_2m and unipc, ``"trailing"`` for dpmpp_3m, ``"karras"`` for
    dpmpp_2m_sde; benchmarks/RESULTS_solvers.md says how they were chosen). The S model calls visit
    ``tau_S, ..., tau_1`` and the last step lands on x_0 (alpha-bar 1), exactly as in :func:`ddim_sample`.
    ``prediction_type``, ``clip_x0`` and ``dynamic_threshold`` act on the model's x0 prediction for every
    solver. ``eta`` and ``sigma_hat`` are DDIM's (eta > 0 or sigma_hat needs a key); the other solvers
    accept only ``eta = 0`` without ``sigma_hat``. ``"dpmpp_2m_sde"`` needs ``key`` (step i's noise is
    ``fold_in(key, i)``); the deterministic solvers ignore it. ``"plms"`` makes S + 1 model calls for
    S >= 2. Returns x_0 with x_T's shape and dtype. See the module docstring for the update formulas and
    the per-step orders.
    """
    spacing = resolve_spacing(solver, spacing)
    entry = SOLVER_TABLE[solver]
    eps_fn, x_T, tau = _prepare(eps_fn, schedule, x_T, "x_T", num_steps, spacing, timesteps, prediction_type)
    _check_eta(eta)
    if solver != "ddim" and (eta != 0 or sigma_hat):
        raise ValueError(f"eta and sigma_hat apply only to solver='ddim'; leave eta at 0 for {solver!r} "
                         f"(got eta={eta!r}, sigma_hat={sigma_hat!r})")
    if entry.sde and key is None:
        raise ValueError(f"key (a jax.random key) is required for solver={solver!r}")
    _check_thresholds(clip_x0, dynamic_threshold)
    opts = dict(prediction_type=prediction_type, clip_x0=None if clip_x0 is None else float(clip_x0),
                dynamic_threshold=None if dynamic_threshold is None else float(dynamic_threshold))
    return entry.decode(entry, eps_fn, schedule, x_T, tau, key, eta, sigma_hat, opts)
