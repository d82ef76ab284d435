"""ddim_jax.solvers: DPM-Solver++ 2M/3M/2M-SDE against diffusers' DPMSolverMultistepScheduler and PLMS
against its PNDMScheduler, driven by the same model (and, for the SDE, the same noise), convergence
orders on the oracle ODE, compile-once, and the argument checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddim_jax as dj
from ddim_jax import solvers

SCHED = dj.make_schedule("linear", 1000)
DPM = ("dpmpp_2m", "dpmpp_3m")


def _far_mixture():
    # Data far from the origin and anisotropic: the x0 prediction changes a lot along the trajectory,
    # so even the early (high-noise) steps move the result by far more than float32 round-off
    # (lowering or raising the order of any single step changes the S = 20 result by > 5e-5
    # relative, 10x the tolerance below).
    return dj.GaussianMixture(np.array([[3.0, -2.0], [-1.5, 1.5]]), np.array([[0.5, 1.5], [0.4, 0.4]]),
                              np.array([0.6, 0.4]))


# ---------------------------------------------------------------------------------------------
# Parity with diffusers


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("S", [10, 20])
@pytest.mark.parametrize("order", [2, 3])
def test_dpmpp_matches_diffusers_multistep_scheduler(order, S, spacing):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    # final_sigmas_type="zero": its last step goes to sigma = 0 (alpha-bar 1) and is first order,
    # like ours; diffusers' defaults, spelled out.
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
        algorithm_type="dpmsolver++", solver_order=order, solver_type="midpoint", lower_order_final=True,
        final_sigmas_type="zero", timestep_spacing=spacing)
    np.testing.assert_allclose(SCHED.betas, sched.betas.numpy(), rtol=1e-6, atol=0)
    sched.set_timesteps(S)
    tau = sched.timesteps.numpy()[::-1].astype(np.int32)  # ours: increasing, visited from the end
    gm = _far_mixture()
    eps_fn = gm.eps_fn(SCHED)
    x_T = np.asarray(jax.random.normal(jax.random.key(0), (64, 2)))
    model = jax.jit(eps_fn)
    x = torch.from_numpy(x_T.copy())
    for t in sched.timesteps:  # the same model, called at the same (x, t)
        out = np.array(model(jnp.asarray(x.numpy()), jnp.full(x.shape[0], int(t), jnp.int32)))
        x = sched.step(torch.from_numpy(out), t, x).prev_sample
    ref = x.numpy()
    if spacing == "trailing":  # diffusers' multistep "trailing" is ours; its "linspace" is not (S + 1 points, 0 dropped)
        np.testing.assert_array_equal(tau, dj.make_timesteps(1000, S, "trailing"))
        ours = dj.sample(eps_fn, SCHED, x_T, S, spacing="trailing", solver=f"dpmpp_{order}m")
    else:
        ours = dj.sample(eps_fn, SCHED, x_T, timesteps=tau, solver=f"dpmpp_{order}m")
    scale = max(1.0, np.abs(ref).max())
    err = np.abs(np.asarray(ours) - ref).max() / scale
    # Measured: <= 1.2e-6 over these 8 cases (float32 round-off); DDIM on the same tau is ~0.5 away.
    assert err < 1e-5, err
    ddim = dj.sample(eps_fn, SCHED, x_T, timesteps=tau)
    assert np.abs(np.asarray(ddim) - ref).max() / scale > 1e-3  # the comparison can tell solvers apart


@pytest.mark.parametrize("S,spacing", [(10, "linspace"), (20, "trailing"), (3, "trailing")])
def test_unipc_matches_diffusers_unipc_scheduler(S, spacing):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, solver_order=2,
        predict_x0=True, solver_type="bh2", lower_order_final=True, disable_corrector=[],
        final_sigmas_type="zero", timestep_spacing=spacing)
    sched.set_timesteps(S)
    tau = sched.timesteps.numpy()[::-1].astype(np.int32)
    gm = _far_mixture()
    eps_fn = gm.eps_fn(SCHED)
    x_T = np.asarray(jax.random.normal(jax.random.key(0), (64, 2)))
    model = jax.jit(eps_fn)
    x = torch.from_numpy(x_T.copy())
    for t in sched.timesteps:
        out = np.array(model(jnp.asarray(x.numpy()), jnp.full(x.shape[0], int(t), jnp.int32)))
        x = sched.step(torch.from_numpy(out), t, x).prev_sample
    ref = x.numpy()
    ours = dj.sample(eps_fn, SCHED, x_T, timesteps=tau, solver="unipc")
    scale = max(1.0, np.abs(ref).max())
    assert np.abs(np.asarray(ours) - ref).max() / scale < 1e-5
    # The corrector is what makes it UniPC: without it the predictor is DPM-Solver++(2M).
    dpm = dj.sample(eps_fn, SCHED, x_T, timesteps=tau, solver="dpmpp_2m")
    assert np.abs(np.asarray(dpm) - ref).max() / scale > 1e-3


def _torch_model(model, torch):
    def call(x, t):
        return torch.from_numpy(np.array(model(jnp.asarray(x.numpy()), jnp.full(x.shape[0], int(t), jnp.int32))))
    return call


@pytest.mark.parametrize("S,spacing", [(10, "linspace"), (20, "trailing")])
def test_dpmpp_2m_sde_matches_diffusers_with_the_same_noise(S, spacing):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
        algorithm_type="sde-dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
        final_sigmas_type="zero", timestep_spacing=spacing)
    sched.set_timesteps(S)
    tau = sched.timesteps.numpy()[::-1].astype(np.int32)
    eps_fn = _far_mixture().eps_fn(SCHED)
    call = _torch_model(jax.jit(eps_fn), torch)
    x_T = np.asarray(jax.random.normal(jax.random.key(0), (64, 2)))
    key = jax.random.key(3)
    x = torch.from_numpy(x_T.copy())
    for i, t in enumerate(sched.timesteps):  # our noise for step i: fold_in(key, i), handed to diffusers
        z = np.asarray(jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32))
        x = sched.step(call(x, t), t, x, variance_noise=torch.from_numpy(z)).prev_sample
    ref = x.numpy()
    ours = np.asarray(dj.sample(eps_fn, SCHED, x_T, timesteps=tau, solver="dpmpp_2m_sde", key=key))
    scale = max(1.0, np.abs(ref).max())
    # Measured: 2.5e-6 (S = 10, linspace), 1.7e-6 (S = 20, trailing): float32 round-off.
    assert np.abs(ours - ref).max() / scale < 1e-5
    # The comparison can tell the noise and the solver apart.
    ode = dj.sample(eps_fn, SCHED, x_T, timesteps=tau, solver="dpmpp_2m")
    assert np.abs(np.asarray(ode) - ref).max() / scale > 1e-2
    other = dj.sample(eps_fn, SCHED, x_T, timesteps=tau, solver="dpmpp_2m_sde", key=jax.random.key(4))
    assert np.abs(np.asarray(other) - ref).max() / scale > 1e-2


def test_dpmpp_2m_sde_is_deterministic_given_the_key():
    eps_fn = _far_mixture().eps_fn(SCHED)
    x_T = jax.random.normal(jax.random.key(1), (64, 2))
    k1, k2 = jax.random.key(7), jax.random.key(8)
    a = dj.sample(eps_fn, SCHED, x_T, 10, solver="dpmpp_2m_sde", key=k1)
    np.testing.assert_array_equal(a, dj.sample(eps_fn, SCHED, x_T, 10, solver="dpmpp_2m_sde", key=k1))
    b = dj.sample(eps_fn, SCHED, x_T, 10, solver="dpmpp_2m_sde", key=k2)
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
    assert float(jnp.abs(a - b).max()) > 0.1
    # With S = 1 the only step lands on x_0 (h = +inf, noise weight sigma_t = 0): no NaN, the key does
    # not matter, and the result is the data prediction, i.e. DDIM's.
    one = dj.sample(eps_fn, SCHED, x_T, 1, solver="dpmpp_2m_sde", key=k1)
    np.testing.assert_array_equal(one, dj.sample(eps_fn, SCHED, x_T, 1, solver="dpmpp_2m_sde", key=k2))
    # Both divide eps's float32 round-off by sqrt(alpha_bar_T) (1/157 here): a few of those ulps apart at most.
    atol = 4 * np.finfo(np.float32).eps / np.sqrt(float(SCHED.alphas_cumprod[-1]))
    np.testing.assert_allclose(one, dj.ddim_sample(eps_fn, SCHED, x_T, 1, spacing="trailing"), rtol=0, atol=atol)


@pytest.mark.parametrize("S,spacing,offset", [(2, "leading", 1), (5, "leading", 0), (20, "leading", 1),
                                              (10, "trailing", 0)])
def test_plms_matches_diffusers_pndm_scheduler(S, spacing, offset):
    # PNDMScheduler(skip_prk_steps=True) steps from t to t - T // S whatever its timestep list says, so its
    # trajectory is one over our tau = its `_timesteps` only where that list is uniform with step T // S:
    # "leading" (any S, any steps_offset) and "trailing" with T % S == 0. Its "linspace" (step ~(T-1)/(S-1))
    # is not expressible: each update lands between the listed timesteps. set_alpha_to_one=True makes its
    # last step land on alpha-bar 1, like ours.
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.PNDMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, skip_prk_steps=True,
        set_alpha_to_one=True, timestep_spacing=spacing, steps_offset=offset)
    np.testing.assert_allclose(SCHED.betas, sched.betas.numpy(), rtol=1e-6, atol=0)
    sched.set_timesteps(S)
    tau = sched._timesteps.astype(np.int32)
    assert np.all(np.diff(tau) == 1000 // S)
    # The same model calls: S + 1 of them, at its timesteps (tau_S, tau_{S-1}, tau_{S-1}, tau_{S-2}, ...).
    np.testing.assert_array_equal(solvers.plms_plan(tau)["t_call"], sched.timesteps.numpy())
    eps_fn = _far_mixture().eps_fn(SCHED)
    call = _torch_model(jax.jit(eps_fn), torch)
    x_T = np.asarray(jax.random.normal(jax.random.key(0), (64, 2)))
    x = torch.from_numpy(x_T.copy())
    for t in sched.timesteps:
        x = sched.step(call(x, t), t, x).prev_sample
    ref = x.numpy()
    ours = np.asarray(dj.sample(eps_fn, SCHED, x_T, timesteps=tau, solver="plms"))
    scale = max(1.0, np.abs(ref).max())
    # Measured: 8.2e-7, 8.4e-7, 6.8e-7, 1.6e-6 for these cases; <= 3.7e-6 over S = 1..20, leading with
    # offset 0 and 1 (float32 round-off).
    assert np.abs(ours - ref).max() / scale < 1e-5
    ddim = dj.sample(eps_fn, SCHED, x_T, timesteps=tau)
    assert np.abs(np.asarray(ddim) - ref).max() / scale > 1e-3


def test_plms_plan():
    p = solvers.plms_plan(np.array([0, 100, 200, 300, 400], np.int32))
    np.testing.assert_array_equal(p["t_call"], [400, 300, 300, 200, 100, 0])
    np.testing.assert_array_equal(p["t_from"], [400, 400, 300, 200, 100, 0])
    np.testing.assert_array_equal(p["t_to"], [300, 300, 200, 100, 0, -1])
    np.testing.assert_array_equal(p["restart"], [0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(p["push"], [1, 0, 1, 1, 1, 1])
    np.testing.assert_allclose(p["weights"] * 24, [[24, 0, 0, 0], [12, 12, 0, 0], [36, -12, 0, 0],
                                                   [46, -32, 10, 0], [55, -59, 37, -9], [55, -59, 37, -9]],
                               rtol=1e-6)
    np.testing.assert_allclose(p["weights"].sum(1), 1, rtol=1e-6)
    one = solvers.plms_plan(np.array([7]))  # S = 1: one DDIM step onto x_0
    np.testing.assert_array_equal(one["t_call"], [7])
    np.testing.assert_array_equal(one["t_to"], [-1])
    gm = _far_mixture()
    x_T = jax.random.normal(jax.random.key(1), (32, 2))
    np.testing.assert_allclose(dj.sample(gm.eps_fn(SCHED), SCHED, x_T, timesteps=[7], solver="plms"),
                               dj.ddim_sample(gm.eps_fn(SCHED), SCHED, x_T, timesteps=[7]), rtol=0, atol=1e-5)


def test_step_orders_follow_diffusers_lower_order_rules():
    # diffusers (lower_order_final=True, final_sigmas_type="zero"): order 1 at the first and the last
    # step, at most 2 at the second, and at the second-to-last when fewer than 15 steps.
    np.testing.assert_array_equal(solvers.step_orders(10, 3), [1, 2, 3, 3, 3, 3, 3, 3, 2, 1])
    np.testing.assert_array_equal(solvers.step_orders(15, 3), [1, 2] + [3] * 12 + [1])
    np.testing.assert_array_equal(solvers.step_orders(10, 2), [1] + [2] * 8 + [1])
    np.testing.assert_array_equal(solvers.step_orders(3, 3), [1, 2, 1])
    np.testing.assert_array_equal(solvers.step_orders(1, 2), [1])


def test_first_order_steps_are_ddim_and_the_last_step_lands_on_x0():
    # With S = 2 both DPM-Solver++ steps are first order (first and last step), which is DDIM
    # (eta = 0); the last one has h = +inf (lambda = +inf at alpha-bar 1) and must return the x0
    # prediction at tau_1 exactly, with no NaN.
    gm = _far_mixture()
    x_T = jax.random.normal(jax.random.key(1), (32, 2))
    ref = dj.ddim_sample(gm.eps_fn(SCHED), SCHED, x_T, timesteps=[150, 700])
    for solver in DPM + ("unipc",):  # UniPC too: its one correction is of x at tau_1, which the x0 there ignores
        out = dj.sample(gm.eps_fn(SCHED), SCHED, x_T, timesteps=[150, 700], solver=solver)
        assert np.all(np.isfinite(out))
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * float(jnp.abs(ref).max()))
    # solver="ddim" is ddim_sample itself, stochastic options included.
    kw = dict(eta=0.5, key=jax.random.key(2), clip_x0=4.0)
    np.testing.assert_array_equal(dj.sample(gm.eps_fn(SCHED), SCHED, x_T, 10, **kw),
                                  dj.ddim_sample(gm.eps_fn(SCHED), SCHED, x_T, 10, **kw))


# ---------------------------------------------------------------------------------------------
# Convergence order on the oracle ODE


def _lambda_grid(n, t_min, t_max=999):
    """n + 1 increasing integer timesteps from t_min to t_max, nearest to a uniform grid in log-SNR."""
    ab = SCHED.alphas_cumprod.astype(np.float64)
    lam = 0.5 * np.log(ab / (1 - ab))
    t = np.unique([np.argmin(np.abs(lam - v)) for v in np.linspace(lam[t_min], lam[t_max], n + 1)])
    assert len(t) == n + 1 and t[0] == t_min and t[-1] == t_max
    return t.astype(np.int32)


def test_convergence_orders_on_the_mixture_ode():
    # The probability-flow ODE of a 2-D two-component mixture (exact eps), from x_T at t = 999 down
    # to t_min = 100, then the (common) final step onto x_0, which is the denoiser at t_min: a
    # smooth map, so the error keeps the ODE solver's order. Stopping at t_min rather than 0 keeps
    # the stiff end (sigma -> 0, where the components separate) out of the measurement; with
    # tau_1 = 0 for every S the slopes come out lower and noisier (2M ~1.5). The reference is
    # dpmpp_3m through every integer timestep in [t_min, 999] (its distance to dpmpp_2m on the
    # same grid, ~2e-6, bounds its error; the smallest error below is ~4e-4).
    #
    # Measured (python -m pytest -q -n 0 tests/test_solvers.py, rms errors at n = 10, 20, 40 ODE
    # steps on a log-SNR-uniform grid; slope of log error against log n):
    #   ddim      8.7e-2 4.4e-2 2.2e-2  slope 0.99
    #   dpmpp_2m  2.9e-2 8.0e-3 1.9e-3  slope 1.96
    #   dpmpp_3m  3.1e-2 3.3e-3 3.9e-4  slope 3.15
    #   unipc     2.4e-2 3.5e-3 3.3e-4  slope 3.08 (then 3.9e-5 at n = 80: local slopes 2.7, 3.4, 3.1)
    # UniPC's corrector raises its order-2 predictor (2M's update) to order 3, as its paper states
    # (order p + 1), at no extra model call.
    # 3M's local slopes fall towards 2 as n grows (3.2, 3.1, then 2.3 from 40 to 80 steps): the
    # 3M update (the original DPM-Solver code's, which diffusers uses and we match) weights D2 by
    # phi_3 = (e^-h - 1 + h)/h^2 - 1/2 while D2 ~ h^2 x0''/2, half of the Taylor term, so it is
    # globally second order with a much smaller constant (a float64 check with that coefficient
    # doubled gives slopes -> 3). Hence "3M at least as steep as 2M, and more accurate", not "3".
    t_min = 100
    gm = dj.GaussianMixture(np.array([[1.0, -0.5], [-1.0, 0.8]]), np.array([[0.3, 0.6], [0.5, 0.3]]))
    eps_fn = gm.eps_fn(SCHED)
    x_T = jax.random.normal(jax.random.key(0), (256, 2))
    full = np.arange(t_min, 1000, dtype=np.int32)
    ref = np.asarray(dj.sample(eps_fn, SCHED, x_T, timesteps=full, solver="dpmpp_3m"), np.float64)
    ref2 = np.asarray(dj.sample(eps_fn, SCHED, x_T, timesteps=full, solver="dpmpp_2m"), np.float64)
    rms = lambda a: float(np.sqrt(np.mean(np.square(a))))
    ns = np.array([10, 20, 40])
    err = {s: np.array([rms(np.asarray(dj.sample(eps_fn, SCHED, x_T, timesteps=_lambda_grid(n, t_min), solver=s))
                            - ref) for n in ns]) for s in ("ddim", "unipc") + DPM}
    assert rms(ref - ref2) < 0.02 * err["dpmpp_3m"].min(), (rms(ref - ref2), err)
    slope = {s: -np.polyfit(np.log(ns), np.log(e), 1)[0] for s, e in err.items()}
    assert 0.85 < slope["ddim"] < 1.15, slope
    assert 1.7 < slope["dpmpp_2m"] < 2.3, slope
    assert slope["dpmpp_3m"] > slope["dpmpp_2m"] + 0.5, slope
    assert 2.6 < slope["unipc"] < 3.5 and np.all(err["unipc"] < err["dpmpp_2m"]), (slope, err)
    assert np.all(err["dpmpp_2m"] < err["ddim"]) and np.all(err["dpmpp_3m"][1:] < 0.5 * err["dpmpp_2m"][1:]), err


# ---------------------------------------------------------------------------------------------
# Compilation, options, argument checks


def test_compiled_once_per_shape_S_and_options():
    traces = []

    def eps_fn(x, t):
        traces.append(x.shape)
        return 0.1 * x

    x = jnp.ones((4, 3))
    dj.sample(eps_fn, SCHED, x, 10, solver="dpmpp_2m")
    assert len(traces) == 1
    dj.sample(eps_fn, SCHED, x, 10, solver="dpmpp_2m", spacing="quadratic")  # other tau values
    dj.sample(eps_fn, SCHED, 2.0 * x, timesteps=np.arange(10) * 7 + 3, solver="dpmpp_2m")  # other x_T values
    assert len(traces) == 1
    # 2M and 3M differ only in the per-step orders, an argument: one program serves both.
    dj.sample(eps_fn, SCHED, x + 1, 10, spacing="trailing", solver="dpmpp_3m")
    assert len(traces) == 1
    dj.sample(eps_fn, SCHED, x, 20, solver="dpmpp_3m")  # another S: another program
    dj.sample(eps_fn, SCHED, x, 20, solver="dpmpp_2m")
    assert len(traces) == 2
    dj.sample(eps_fn, SCHED, x, 20, solver="dpmpp_2m", clip_x0=1.0)  # another option: another program
    assert len(traces) == 3
    # The SDE variant is its own program (it draws noise); new keys and new tau values reuse it.
    dj.sample(eps_fn, SCHED, x, 10, solver="dpmpp_2m_sde", key=jax.random.key(0))
    assert len(traces) == 4
    dj.sample(eps_fn, SCHED, x, 10, solver="dpmpp_2m_sde", key=jax.random.key(1), spacing="trailing")
    assert len(traces) == 4
    # UniPC (the corrector is a static flag): one more program, whatever the tau values.
    dj.sample(eps_fn, SCHED, x, 10, solver="unipc")
    dj.sample(eps_fn, SCHED, x + 1, 10, solver="unipc", spacing="karras")
    assert len(traces) == 5
    # PLMS: one program per S, whatever the tau values.
    dj.sample(eps_fn, SCHED, x, 10, solver="plms")
    assert len(traces) == 6
    dj.sample(eps_fn, SCHED, x - 1, 10, solver="plms", spacing="leading")
    dj.sample(eps_fn, SCHED, x, timesteps=np.arange(10) * 7 + 3, solver="plms")
    assert len(traces) == 6
    dj.sample(eps_fn, SCHED, x, 11, solver="plms")
    assert len(traces) == 7


def test_each_solver_samples_on_its_default_spacing():
    gm = _far_mixture()
    x_T = jax.random.normal(jax.random.key(3), (16, 2))
    for solver, spacing in solvers.DEFAULT_SPACING.items():
        key = jax.random.key(4) if solver == "dpmpp_2m_sde" else None
        default = dj.sample(gm.eps_fn(SCHED), SCHED, x_T, 10, solver=solver, key=key)
        given = dj.sample(gm.eps_fn(SCHED), SCHED, x_T, 10, solver=solver, key=key, spacing=spacing)
        np.testing.assert_array_equal(default, given)
    assert set(solvers.DEFAULT_SPACING) == set(dj.SOLVERS)
    with pytest.raises(ValueError, match="solver must be one of"):
        solvers.resolve_spacing("euler", None)


def test_the_default_spacing_makes_dpmpp_2m_beat_ddim_at_10_calls():
    # Why DPM-Solver++ does not default to DDIM's uniform tau: on the 8-Gaussian ring its last 2nd-order
    # step (t = 100 -> 0) overshoots and it loses to DDIM by ~12x; on its default (exponential) it wins
    # (benchmarks/RESULTS_solvers.md: ~0.4-0.5x DDIM's energy distance, 3 draws of 4000 and of 2000).
    ang = np.arange(8) * 2 * np.pi / 8
    gm = dj.GaussianMixture(np.stack([np.cos(ang), np.sin(ang)], 1), 0.1)
    x_T = jax.random.normal(jax.random.key(0), (3000, 2))
    ref = gm.sample(jax.random.key(1), 3000)
    dist = lambda **kw: float(dj.energy_distance(dj.sample(gm.eps_fn(SCHED), SCHED, x_T, 10, **kw), ref))  # noqa: E731
    ddim, dpm = dist(solver="ddim"), dist(solver="dpmpp_2m")
    assert dpm < 0.8 * ddim, (dpm, ddim)
    assert dist(solver="dpmpp_2m", spacing="uniform") > 3 * ddim  # what the default avoids


def test_prediction_types_give_the_same_samples():
    gm = _far_mixture()
    x_T = jax.random.normal(jax.random.key(5), (64, 2))
    out = {p: dj.sample(gm.eps_fn(SCHED, p), SCHED, x_T, 20, solver="dpmpp_3m", prediction_type=p)
           for p in dj.PREDICTION_TYPES}
    np.testing.assert_allclose(out["v"], out["epsilon"], atol=1e-4)
    np.testing.assert_allclose(out["x0"], out["epsilon"], atol=1e-4)
    for solver in ("plms", "unipc"):
        out = {p: dj.sample(gm.eps_fn(SCHED, p), SCHED, x_T, 20, solver=solver, prediction_type=p)
               for p in dj.PREDICTION_TYPES}
        np.testing.assert_allclose(out["v"], out["epsilon"], atol=1e-4)
        np.testing.assert_allclose(out["x0"], out["epsilon"], atol=1e-4)


def test_zero_terminal_snr_start_is_finite():
    # alpha-bar = 0 at the first step: lambda = -inf there, h = +inf on the first step, and that
    # history point gets zero weight in the later (order 2 and 3) steps.
    s = dj.make_schedule("linear", 1000, rescale_zero_terminal_snr=True)
    gm = _far_mixture()
    x_T = jax.random.normal(jax.random.key(5), (64, 2))
    with pytest.raises(ValueError, match="prediction_type='epsilon' cannot be used with a zero-terminal-SNR"):
        dj.sample(gm.eps_fn(s), s, x_T, 20, spacing="trailing", solver="dpmpp_3m")
    ddim = dj.sample(gm.eps_fn(s, "v"), s, x_T, 200, spacing="trailing", prediction_type="v")
    for solver in ("dpmpp_3m", "unipc"):
        out = dj.sample(gm.eps_fn(s, "v"), s, x_T, 20, spacing="trailing", solver=solver, prediction_type="v")
        assert np.all(np.isfinite(out)), solver
        assert float(jnp.abs(out - ddim).max()) < 0.1, solver  # both near the same ODE solution


def test_clipping_and_thresholding_apply_to_the_x0_predictions():
    gm = _far_mixture()  # data far outside [-1, 1]
    x_T = jax.random.normal(jax.random.key(0), (64, 2))
    assert float(jnp.abs(dj.sample(gm.eps_fn(SCHED), SCHED, x_T, 10, solver="dpmpp_2m")).max()) > 2
    for kw in ({"clip_x0": 1.0}, {"dynamic_threshold": 0.9}):
        y = dj.sample(gm.eps_fn(SCHED), SCHED, x_T, 10, solver="dpmpp_2m", **kw)
        assert float(jnp.abs(y).max()) <= 1.0 + 1e-6, kw  # the last step returns the thresholded x0


@pytest.mark.parametrize("kwargs,error,match", [
    ({"solver": "heun"}, ValueError,
     r"solver must be one of 'ddim', 'dpmpp_2m', 'dpmpp_3m', 'dpmpp_2m_sde', 'unipc', 'plms'; got 'heun'"),
    ({"solver": "dpmpp_2m", "eta": 0.5}, ValueError, "eta and sigma_hat apply only to solver='ddim'"),
    ({"solver": "dpmpp_3m", "eta": 1.0, "key": jax.random.key(0)}, ValueError,
     "eta and sigma_hat apply only to solver='ddim'"),
    ({"solver": "dpmpp_2m_sde", "eta": 1.0, "key": jax.random.key(0)}, ValueError,
     "eta and sigma_hat apply only to solver='ddim'"),
    ({"solver": "plms", "sigma_hat": True}, ValueError, "eta and sigma_hat apply only to solver='ddim'"),
    ({"solver": "dpmpp_2m_sde"}, ValueError, r"key \(a jax.random key\) is required for solver='dpmpp_2m_sde'"),
    ({"solver": "dpmpp_2m_sde", "key": jax.random.key(0), "num_steps": 0}, ValueError,
     "num_steps must be an integer >= 1"),
    ({"solver": "plms", "num_steps": 1001}, ValueError, "num_steps must be <= num_timesteps"),
    ({"solver": "plms", "x_T": jnp.ones((4, 3), jnp.int32)}, ValueError, "x_T must be a floating-point array"),
    ({"solver": "plms", "clip_x0": 0.0}, ValueError, "clip_x0 must be None or a number"),
    ({"solver": "plms", "prediction_type": "v", "spacing": "trailing",
      "schedule": dj.make_schedule("linear", 1000, rescale_zero_terminal_snr=True)}, ValueError,
     "solver='plms' cannot start at alpha_bar = 0"),
    ({"solver": "dpmpp_2m", "eta": float("nan")}, ValueError, "eta must be a finite real number >= 0"),
    ({"solver": "dpmpp_2m", "eta": np.float32("inf")}, ValueError, "eta must be a finite real number >= 0"),
    ({"solver": "dpmpp_2m", "eta": -0.1}, ValueError, "eta must be a finite real number >= 0"),
    ({"solver": "ddim", "eta": float("inf"), "key": jax.random.key(0)}, ValueError, "eta must be a finite real"),
    ({"solver": "ddim", "eta": 0.5}, ValueError, "key .* is required"),
    ({"solver": "dpmpp_2m", "num_steps": 0}, ValueError, "num_steps must be an integer >= 1"),
    ({"solver": "dpmpp_3m", "num_steps": 1001}, ValueError, "num_steps must be <= num_timesteps"),
    ({"solver": "dpmpp_3m", "num_steps": None}, ValueError, "num_steps is required"),
    ({"solver": "dpmpp_3m", "timesteps": [3, 2]}, ValueError, "give num_steps or timesteps, not both"),
    ({"solver": "dpmpp_3m", "num_steps": None, "timesteps": [3, 3]}, ValueError, "timesteps must be a non-empty"),
    ({"solver": "dpmpp_2m", "x_T": jnp.ones((4, 3), jnp.int32)}, ValueError,
     "x_T must be a floating-point array; got int32"),
    ({"solver": "dpmpp_2m", "x_T": np.ones((4, 3), bool)}, ValueError, "x_T must be a floating-point array; got bool"),
    ({"solver": "dpmpp_2m", "x_T": jnp.float32(1.0)}, ValueError, r"x_T must be an array of shape \[batch"),
    ({"solver": "dpmpp_2m", "spacing": "cubic"}, ValueError, "spacing must be one of"),
    ({"solver": "dpmpp_2m", "prediction_type": "score"}, ValueError, "prediction_type must be one of"),
    ({"solver": "dpmpp_2m", "clip_x0": 0.0}, ValueError, "clip_x0 must be None or a number"),
    ({"solver": "dpmpp_3m", "dynamic_threshold": 1.5}, ValueError, "dynamic_threshold must be None or a number"),
    ({"solver": "dpmpp_2m", "eps_fn": "unet"}, TypeError, "eps_fn must be callable"),
    ({"solver": "dpmpp_2m", "eps_fn": lambda x, t: x[:, :1]}, ValueError, r"eps_fn returned shape \(4, 1\)"),
    ({"solver": "dpmpp_2m", "schedule": np.ones(10)}, TypeError, "schedule must be a ddim_jax.Schedule"),
])
def test_bad_arguments(kwargs, error, match):
    args = {"eps_fn": lambda x, t: 0 * x, "schedule": SCHED, "x_T": jnp.ones((4, 3)), "num_steps": 10}
    args.update(kwargs)
    with pytest.raises(error, match=match) as info:
        dj.sample(args.pop("eps_fn"), args.pop("schedule"), args.pop("x_T"), args.pop("num_steps"), **args)
    assert "\n" not in str(info.value)
