import math

import numpy as np
import pytest

from ddim_jax import SPACINGS, make_schedule, make_timesteps
from ddim_jax.schedules import SIGMA_SPACINGS, _distinct_increasing


def test_linear_matches_ddpm_and_alpha_bar_is_the_cumulative_product():
    s = make_schedule("linear", 1000)
    assert s.betas.dtype == np.float32 and s.alphas_cumprod.dtype == np.float32
    assert s.betas[0] == np.float32(1e-4) and s.betas[-1] == np.float32(0.02)
    np.testing.assert_allclose(np.diff(s.betas.astype(np.float64)), (0.02 - 1e-4) / 999, rtol=1e-4)
    t = np.array([0, 1, 10, 500, 999])
    expected = [math.prod(1.0 - (1e-4 + (0.02 - 1e-4) * k / 999) for k in range(i + 1)) for i in t]
    np.testing.assert_allclose(s.alpha_bar(t), expected, rtol=1e-5)
    assert s.alpha_bar(-1) == 1.0  # x_0 has alpha-bar exactly 1 (a_0 = 1 in the paper)


def test_quadratic_and_scaled_linear_have_linear_square_roots():
    for name, lo, hi in (("quadratic", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012)):
        b = make_schedule(name, 100).betas.astype(np.float64)
        np.testing.assert_allclose(np.sqrt(b[[0, -1]]), np.sqrt([lo, hi]), rtol=1e-6)
        np.testing.assert_allclose(np.diff(np.sqrt(b), 2), 0.0, atol=1e-6)


def test_cosine_follows_the_squared_cosine_alpha_bar():
    T = 1000
    s = make_schedule("cosine", T)
    f = lambda t: np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2
    t = np.arange(0, 900, 37)  # away from the 0.999 cap
    np.testing.assert_allclose(s.alpha_bar(t), f(t + 1) / f(0), rtol=1e-4)
    assert s.betas.max() <= np.float32(0.999)


def test_sigmoid_is_symmetric_about_its_midpoint():
    b = make_schedule("sigmoid", 200).betas.astype(np.float64)
    np.testing.assert_allclose(b + b[::-1], 1e-4 + 0.02, rtol=1e-5)
    assert np.all(np.diff(b) > 0)


def test_zero_terminal_snr_rescaling():
    base = make_schedule("scaled_linear", 1000)
    s = make_schedule("scaled_linear", 1000, rescale_zero_terminal_snr=True)
    assert s.alphas_cumprod[-1] == 0.0 and s.zero_terminal_snr and not base.zero_terminal_snr
    np.testing.assert_allclose(s.alphas_cumprod[0], base.alphas_cumprod[0], rtol=1e-6)
    # sqrt(alpha-bar) is an affine function of the original one (Lin et al., Algorithm 1).
    u, v = np.sqrt(base.alphas_cumprod.astype(np.float64)), np.sqrt(s.alphas_cumprod.astype(np.float64))
    slope, intercept = np.polyfit(u, v, 1)
    np.testing.assert_allclose(v, slope * u + intercept, atol=1e-5)


def test_custom_betas_and_bad_schedules():
    s = make_schedule("custom", betas=[0.1, 0.2, 0.3])
    np.testing.assert_allclose(s.alphas_cumprod, [0.9, 0.72, 0.504], rtol=1e-6)
    with pytest.raises(ValueError, match="name must be one of"):
        make_schedule("cosinus")
    with pytest.raises(ValueError, match="num_timesteps"):
        make_schedule("linear", 0)
    with pytest.raises(ValueError, match="betas must be finite and in"):
        make_schedule("custom", betas=[0.1, 0.0])
    with pytest.raises(ValueError, match="beta_start"):
        make_schedule("linear", 10, beta_start=0.3, beta_end=0.1)


PAIRS = [(T, S) for T in (1, 7, 10, 100, 999, 1000, 1001) for S in (1, 2, 3, 7, 10, 33, 50, 100, 999, 1000) if S <= T]


@pytest.mark.parametrize("spacing", SPACINGS)
def test_every_spacing_gives_exactly_S_distinct_increasing_steps(spacing):
    for T, S in PAIRS:
        # karras / exponential place steps by the schedule's sigmas; the others ignore schedule=.
        tau = make_timesteps(T, S, spacing, schedule=make_schedule("linear", T))
        if spacing not in SIGMA_SPACINGS:
            np.testing.assert_array_equal(tau, make_timesteps(T, S, spacing))
        assert tau.dtype == np.int32 and tau.shape == (S,), (T, S)
        assert tau[0] >= 0 and tau[-1] <= T - 1, (T, S, tau)
        assert np.all(np.diff(tau) > 0), (T, S, tau)
        if S == T:
            np.testing.assert_array_equal(tau, np.arange(T))


def test_paper_spacings_match_the_papers_code_where_that_code_is_well_defined():
    T = 1000
    for S in (10, 20, 50, 100, 1000):  # T % S == 0: range(0, T, T // S) has exactly S entries
        np.testing.assert_array_equal(make_timesteps(T, S, "uniform"), np.arange(0, T, T // S))
    for S in (10, 20):  # the paper's quadratic code has no repeats here
        paper = [int(s) for s in np.linspace(0, np.sqrt(T * 0.8), S) ** 2]
        assert len(set(paper)) == S
        np.testing.assert_array_equal(make_timesteps(T, S, "quadratic"), paper)
    # T % S != 0: the paper's code would give 13 steps for S = 7 (skip 142); we give 7, evenly spread.
    np.testing.assert_array_equal(make_timesteps(1000, 7, "uniform"), [0, 142, 285, 428, 571, 714, 857])


def test_quadratic_repairs_the_papers_repeated_steps():
    paper = [int(s) for s in np.linspace(0, np.sqrt(800), 100) ** 2]
    assert len(set(paper)) < 100  # the wasted repeats the paper's code makes
    tau = make_timesteps(1000, 100, "quadratic")
    assert len(set(tau.tolist())) == 100 and tau[-1] == 800
    big = np.asarray(paper[60:])  # past the repeats it is the paper's sequence
    np.testing.assert_array_equal(tau[60:], big)


def test_diffusers_spacings_match_diffusers_ddim_scheduler():
    diffusers = pytest.importorskip("diffusers")
    names = {"leading": "leading", "trailing": "trailing", "linspace": "linspace"}
    for ours, theirs in names.items():
        for T, S in ((1000, 10), (1000, 50), (1000, 1000), (100, 7), (1000, 3)):
            sched = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing=theirs)
            sched.set_timesteps(S)
            np.testing.assert_array_equal(make_timesteps(T, S, ours), np.sort(sched.timesteps.numpy()),
                                          err_msg=f"{ours} T={T} S={S}")


def test_sigma_spacings_keep_the_contract_on_other_schedules():
    # Zero terminal SNR (sigma_max from alpha-bar 2^-24, repeats at the top) and cosine.
    for sched in (make_schedule("scaled_linear", 1000, rescale_zero_terminal_snr=True), make_schedule("cosine", 1000)):
        for spacing in SIGMA_SPACINGS:
            for S in (1, 2, 10, 50, 200, 999, 1000):
                tau = make_timesteps(1000, S, spacing, schedule=sched)
                assert tau.shape == (S,) and tau[0] >= 0 and tau[-1] == 999 and np.all(np.diff(tau) > 0), (S, tau)


def test_distinct_increasing_moves_repeats_up_and_caps_at_the_top():
    np.testing.assert_array_equal(_distinct_increasing(np.array([0, 0, 0, 4, 9]), 10), [0, 1, 2, 4, 9])
    np.testing.assert_array_equal(_distinct_increasing(np.array([0, 5, 5]), 6), [0, 4, 5])
    np.testing.assert_array_equal(_distinct_increasing(np.array([3, 3, 3]), 3), [0, 1, 2])
    np.testing.assert_array_equal(_distinct_increasing(np.array([0, 3, 7]), 8), [0, 3, 7])


def test_sigma_spacings_follow_the_karras_and_log_uniform_sigmas():
    # Independent of diffusers: sigma(tau) interpolated in log sigma (before rounding) traces the
    # Karras rho = 7 curve / a straight line in log sigma between sigma(0) and sigma(T - 1).
    s = make_schedule("linear", 1000)
    ab = s.alphas_cumprod.astype(np.float64)
    log_sig = 0.5 * np.log((1 - ab) / ab)
    S = 12
    r = np.linspace(0, 1, S)
    lo, hi = np.exp(log_sig[0]) ** (1 / 7), np.exp(log_sig[-1]) ** (1 / 7)
    want = {"karras": 7 * np.log(lo + r * (hi - lo)), "exponential": log_sig[0] + r * (log_sig[-1] - log_sig[0])}
    for spacing, target in want.items():
        tau = make_timesteps(1000, S, spacing, schedule=s)
        assert tau[0] == 0 and tau[-1] == 999
        # each tau is the integer next to (round: nearest; exponential: just below) the exact t
        t_exact = np.interp(target, log_sig, np.arange(1000.0))
        if spacing == "karras":
            assert np.all(np.abs(tau - t_exact) <= 0.5 + 1e-9), (tau, t_exact)
        else:
            assert np.all((tau <= t_exact + 1e-9) & (t_exact < tau + 1)), (tau, t_exact)


@pytest.mark.parametrize("spacing,flag", [("karras", "use_karras_sigmas"), ("exponential", "use_exponential_sigmas")])
def test_sigma_spacings_match_diffusers_dpm_solver(spacing, flag):
    diffusers = pytest.importorskip("diffusers")
    s = make_schedule("linear", 1000)
    # S -> whether diffusers repeats a timestep there (it keeps repeats; we move them up).
    cases = {"karras": {10: False, 20: False, 50: False, 100: True, 500: True},
             "exponential": {10: False, 20: False, 50: True, 200: True}}[spacing]
    for S, has_repeats in cases.items():
        sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", **{flag: True})
        sched.set_timesteps(S)
        theirs = sched.timesteps.numpy()[::-1].astype(np.int64)
        assert (len(set(theirs.tolist())) < S) == has_repeats, (S, theirs)
        want = _distinct_increasing(theirs, 1000) if has_repeats else theirs
        np.testing.assert_array_equal(make_timesteps(1000, S, spacing, schedule=s), want, err_msg=f"{spacing} S={S}")
    if spacing == "karras":  # zero terminal SNR: both use alpha-bar 2^-24 at T - 1
        zsnr = make_schedule("scaled_linear", 1000, rescale_zero_terminal_snr=True)
        for S in (10, 50):  # S = 50: diffusers repeats 999 three times; we cap them at 997, 998, 999
            sched = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                          beta_end=0.012, rescale_betas_zero_snr=True, **{flag: True})
            sched.set_timesteps(S)
            theirs = _distinct_increasing(sched.timesteps.numpy()[::-1].astype(np.int64), 1000)
            np.testing.assert_array_equal(make_timesteps(1000, S, spacing, schedule=zsnr), theirs, err_msg=f"S={S}")


def test_dpmpp_2m_with_karras_spacing_converges_on_the_oracle_mixture():
    import jax
    import ddim_jax as dj

    sched = make_schedule("linear", 1000)
    gm = dj.GaussianMixture(np.array([[3.0, -2.0], [-1.5, 1.5]]), np.array([[0.5, 1.5], [0.4, 0.4]]),
                            np.array([0.6, 0.4]))
    eps_fn = gm.eps_fn(sched)
    x_T = jax.random.normal(jax.random.key(0), (256, 2))
    ref = np.asarray(dj.sample(eps_fn, sched, x_T, timesteps=np.arange(1000), solver="dpmpp_2m"), np.float64)
    rms = lambda a: float(np.sqrt(np.mean(np.square(a))))
    err = {S: rms(np.asarray(dj.sample(eps_fn, sched, x_T, S, solver="dpmpp_2m", spacing="karras")) - ref)
           for S in (20, 50)}
    # Measured: 0.109 at S = 20, 0.0093 at S = 50 (the data spread is ~1).
    assert err[50] < 0.02 and err[50] < 0.2 * err[20], err
    # spacing= reached the solver: karras tau, not uniform tau (which gives 0.025 at S = 50).
    uniform = np.asarray(dj.sample(eps_fn, sched, x_T, 50, solver="dpmpp_2m", spacing="uniform"))
    assert rms(uniform - ref) > 2 * err[50], (rms(uniform - ref), err)
    karras_tau = dj.sample(eps_fn, sched, x_T, timesteps=make_timesteps(1000, 50, "karras", schedule=sched),
                           solver="dpmpp_2m")
    np.testing.assert_array_equal(np.asarray(karras_tau), np.asarray(
        dj.sample(eps_fn, sched, x_T, 50, solver="dpmpp_2m", spacing="karras")))


def test_sigma_spacings_need_the_schedule():
    for spacing in SIGMA_SPACINGS:
        with pytest.raises(ValueError, match="pass schedule="):
            make_timesteps(1000, 10, spacing)
    with pytest.raises(ValueError, match="schedule has 100 timesteps but num_timesteps is 1000"):
        make_timesteps(1000, 10, "karras", schedule=make_schedule("linear", 100))
    with pytest.raises(TypeError, match="schedule must be a ddim_jax.Schedule"):
        make_timesteps(1000, 10, "karras", schedule=np.ones(1000))


@pytest.mark.parametrize("T,S,spacing,match", [
    (100, 101, "uniform", "num_steps must be <= num_timesteps"),
    (100, 0, "uniform", "num_steps must be an integer >= 1"),
    (100, 2.5, "uniform", "num_steps must be an integer"),
    (100, 10, "cubic", "spacing must be one of"),
])
def test_bad_timestep_arguments(T, S, spacing, match):
    with pytest.raises(ValueError, match=match):
        make_timesteps(T, S, spacing)
