import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddim_jax as dj

SCHED = dj.make_schedule("linear", 1000)


def _consistent(t, t_prev, n=6, d=5, seed=0):
    """x_0, eps and the x_t they define, with the alpha-bars of t and t_prev."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    x0 = jax.random.normal(k1, (n, d))
    eps = jax.random.normal(k2, (n, d))
    a_t, a_prev = SCHED.alpha_bar(t), SCHED.alpha_bar(t_prev)
    return x0, eps, dj.q_sample(x0, jnp.full(n, a_t), eps), float(a_t), float(a_prev)


@pytest.mark.parametrize("t,t_prev", [(500, 499), (10, 9), (900, 700), (300, 0), (1, 0), (999, 600)])
def test_eta_one_is_the_ddpm_posterior(t, t_prev):
    # q(x_{t'} | x_t, x_0) of the forward process, with beta = 1 - a_t / a_t' (one step when t' = t - 1).
    x0, eps, xt, a_t, a_p = _consistent(t, t_prev)
    beta = 1 - a_t / a_p
    mean = np.sqrt(a_p) * beta / (1 - a_t) * x0 + np.sqrt(1 - beta) * (1 - a_p) / (1 - a_t) * xt
    var = (1 - a_p) / (1 - a_t) * beta
    zero, _ = dj.ddim_step(xt, eps, a_t=a_t, a_prev=a_p, noise=jnp.zeros_like(xt), eta=1.0)
    one, x0_pred = dj.ddim_step(xt, eps, a_t=a_t, a_prev=a_p, noise=jnp.ones_like(xt), eta=1.0)
    np.testing.assert_allclose(zero, mean, atol=2e-4)
    np.testing.assert_allclose(one - zero, np.sqrt(var), rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(x0_pred, x0, atol=2e-3)


@pytest.mark.parametrize("t,t_prev", [(500, 499), (900, 700), (999, 600)])
def test_sigma_hat_is_the_posterior_mean_with_the_larger_variance(t, t_prev):
    x0, eps, xt, a_t, a_p = _consistent(t, t_prev)
    beta = 1 - a_t / a_p
    mean = np.sqrt(a_p) * beta / (1 - a_t) * x0 + np.sqrt(1 - beta) * (1 - a_p) / (1 - a_t) * xt
    zero, _ = dj.ddim_step(xt, eps, a_t=a_t, a_prev=a_p, noise=jnp.zeros_like(xt), sigma_hat=True)
    one, _ = dj.ddim_step(xt, eps, a_t=a_t, a_prev=a_p, noise=jnp.ones_like(xt), sigma_hat=True)
    np.testing.assert_allclose(zero, mean, atol=2e-4)
    np.testing.assert_allclose(one - zero, np.sqrt(beta), rtol=1e-3)
    # The step that lands on x_0 adds no noise and returns x0 itself.
    last, x0_pred = dj.ddim_step(xt, eps, a_t=a_t, a_prev=1.0, noise=jnp.ones_like(xt), sigma_hat=True)
    np.testing.assert_allclose(last, x0_pred, atol=1e-6)


def test_eta_zero_is_deterministic_and_eta_positive_adds_noise_of_std_sigma():
    x0, eps, xt, a_t, a_p = _consistent(800, 600)
    det, _ = dj.ddim_step(xt, eps, a_t=a_t, a_prev=a_p)
    np.testing.assert_allclose(det, np.sqrt(a_p) * x0 + np.sqrt(1 - a_p) * eps, atol=2e-4)  # eq. 12, sigma = 0
    with pytest.raises(ValueError, match="noise is required"):
        dj.ddim_step(xt, eps, a_t=a_t, a_prev=a_p, eta=0.5)
    # Through the sampler: two steps (800 -> 600 -> x_0); the spread of x after the first step,
    # across many copies of one x_T, is sigma.
    eta = 0.7
    sigma = eta * np.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
    x_T = jnp.full((20_000, 3), 0.3)
    zero_eps = lambda x, t: jnp.zeros_like(x)
    _, xs, _ = dj.ddim_sample(zero_eps, SCHED, x_T, timesteps=[600, 800], eta=eta, key=jax.random.key(3),
                              return_trajectory=True)
    np.testing.assert_allclose(np.std(xs[0], axis=0), sigma, rtol=2e-2)
    same = [dj.ddim_sample(zero_eps, SCHED, x_T[:4], timesteps=[600, 800], key=jax.random.key(k)) for k in (0, 1)]
    np.testing.assert_array_equal(same[0], same[1])
    noisy = [dj.ddim_sample(zero_eps, SCHED, x_T[:4], timesteps=[600, 800], eta=eta, key=jax.random.key(k))
             for k in (0, 1)]
    assert np.abs(noisy[0] - noisy[1]).min() > 0


def test_ddim_step_alpha_bars_and_noise_are_keyword_only():
    x0, eps, xt, a_t, a_p = _consistent(800, 600)
    with pytest.raises(TypeError):
        dj.ddim_step(xt, eps, a_t, a_p)
    with pytest.raises(TypeError):
        dj.ddim_step(xt, eps, a_t, a_prev=a_p)
    with pytest.raises(TypeError):
        dj.ddim_step(xt, eps, a_t, a_p, jnp.zeros_like(xt), eta=1.0)
    # Swapping the two alpha-bars by name is the same step: only the names matter.
    by_name, _ = dj.ddim_step(xt, eps, a_prev=a_p, a_t=a_t)
    np.testing.assert_allclose(by_name, np.sqrt(a_p) * x0 + np.sqrt(1 - a_p) * eps, atol=2e-4)


@pytest.mark.parametrize("eta", [float("inf"), float("-inf"), float("nan"), np.float32("inf"), np.float64("nan"), -0.5])
def test_ddim_step_rejects_a_concrete_eta_that_is_not_finite_and_non_negative(eta):
    _, eps, xt, a_t, a_p = _consistent(800, 600)
    with pytest.raises(ValueError, match="eta must be a finite real number >= 0"):
        dj.ddim_step(xt, eps, a_t=a_t, a_prev=a_p, noise=jnp.zeros_like(xt), eta=eta)


def test_ddim_step_with_a_traced_eta_is_not_checked_on_the_host():
    # Under jit eta is a tracer (the sampler passes it that way); the step still matches eq. 12.
    x0, eps, xt, a_t, a_p = _consistent(800, 600)
    z = jax.random.normal(jax.random.key(7), xt.shape)
    step = jax.jit(lambda e: dj.ddim_step(xt, eps, a_t=a_t, a_prev=a_p, noise=z, eta=e)[0])
    eta = 0.4
    sigma = eta * np.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
    expected = np.sqrt(a_p) * x0 + np.sqrt(1 - a_p - sigma**2) * eps + sigma * z
    np.testing.assert_allclose(step(eta), expected, atol=2e-4)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_])
def test_integer_inputs_are_rejected_not_truncated(dtype):
    zero_eps = lambda x, t: jnp.zeros_like(x)
    x = jnp.ones((4, 3), dtype)
    name = jnp.dtype(dtype).name
    with pytest.raises(ValueError, match=f"x_T must be a floating-point array; got {name}"):
        dj.ddim_sample(zero_eps, SCHED, x, 10)
    with pytest.raises(ValueError, match=f"x_0 must be a floating-point array; got {name}"):
        dj.ddim_encode(zero_eps, SCHED, x, 10)
    with pytest.raises(ValueError, match=f"x_t must be a floating-point array; got {name}"):
        dj.ddim_step(x, jnp.zeros((4, 3)), a_t=0.5, a_prev=0.9)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_floating_inputs_keep_their_dtype(dtype):
    # With a zero model output, eq. 12 at eta = 0 scales x by sqrt(a_prev / a_t) per step, so the
    # whole decode is x_T * sqrt(1 / alpha_bar(tau_S)).
    zero_eps = lambda x, t: jnp.zeros_like(x)
    x_T = jnp.full((4, 3), 0.25, dtype)
    out = dj.ddim_sample(zero_eps, SCHED, x_T, timesteps=[100, 200])
    assert out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), 0.25 / np.sqrt(float(SCHED.alpha_bar(200))), rtol=1e-2)
    assert dj.ddim_encode(zero_eps, SCHED, x_T, timesteps=[100, 200]).dtype == dtype


def _mixture():
    means = np.random.default_rng(0).uniform(-0.8, 0.8, (6, 16))
    return dj.GaussianMixture(means, 0.1)


@pytest.fixture(scope="module")
def mixture_runs():
    gm = _mixture()
    eps_fn = gm.eps_fn(SCHED)
    n = 3000
    x_T = jax.random.normal(jax.random.key(0), (n, gm.dim))
    data = gm.sample(jax.random.key(1), n)
    runs = {}
    for S, eta in ((10, 0.0), (20, 0.0), (100, 0.0), (10, 1.0), (20, 1.0)):  # DDPM (eta = 1) only at few steps
        runs[S, eta] = dj.ddim_sample(eps_fn, SCHED, x_T, S, spacing="quadratic", eta=eta, key=jax.random.key(2))
    dist = {k: float(dj.energy_distance(x, data)) for k, x in runs.items()}  # to the data, one call per run
    return gm, data, runs, dist


def test_ddim_with_the_exact_model_reproduces_the_mixture(mixture_runs):
    gm, data, runs, dist = mixture_runs
    x = np.asarray(runs[100, 0.0])
    np.testing.assert_allclose(x.mean(0), gm.mean(), atol=0.03)
    np.testing.assert_allclose(np.cov(x.T), gm.cov(), atol=0.03)
    dist = {S: dist[S, 0.0] for S in (10, 20, 100)}
    floor = float(dj.energy_distance(gm.sample(jax.random.key(9), len(data)), data))
    assert dist[10] > dist[20] > dist[100], dist
    assert dist[100] < abs(floor) + 2e-3, (dist, floor)


def test_ddim_beats_ddpm_at_few_steps(mixture_runs):
    # The ordering of the paper's Table 1 (eta = 0 better than eta = 1 at S = 10 and 20).
    dist = mixture_runs[3]
    for S in (10, 20):
        d0, d1 = dist[S, 0.0], dist[S, 1.0]
        assert d1 > 1.5 * d0, (S, d0, d1)


def test_prediction_types_give_the_same_samples():
    gm = _mixture()
    x_T = jax.random.normal(jax.random.key(5), (64, gm.dim))
    out = {p: dj.ddim_sample(gm.eps_fn(SCHED, p), SCHED, x_T, 20, prediction_type=p) for p in dj.PREDICTION_TYPES}
    np.testing.assert_allclose(out["v"], out["epsilon"], atol=1e-4)
    np.testing.assert_allclose(out["x0"], out["epsilon"], atol=1e-4)


def test_zero_terminal_snr_needs_v_prediction():
    s = dj.make_schedule("linear", 1000, rescale_zero_terminal_snr=True)
    gm = _mixture()
    x_T = jax.random.normal(jax.random.key(5), (8, gm.dim))
    with pytest.raises(ValueError, match="prediction_type='epsilon' cannot be used with a zero-terminal-SNR"):
        dj.ddim_sample(gm.eps_fn(s), s, x_T, 10, spacing="trailing")
    x = dj.ddim_sample(gm.eps_fn(s, "v"), s, x_T, 10, spacing="trailing", prediction_type="v")
    assert np.all(np.isfinite(x))


def test_encode_then_decode_reconstructs_better_as_S_grows():
    gm = _mixture()
    eps_fn = gm.eps_fn(SCHED)
    x0 = gm.sample(jax.random.key(4), 256)
    err, spread = {}, {}
    for S in (5, 20, 100, 500):
        x_T, xs = dj.ddim_encode(eps_fn, SCHED, x0, S, return_trajectory=True)
        assert xs.shape == (S, *x0.shape)  # exactly S model steps, like decoding
        np.testing.assert_array_equal(xs[-1], x_T)
        err[S] = float(jnp.mean((dj.ddim_sample(eps_fn, SCHED, x_T, S) - x0) ** 2))
        spread[S] = float(jnp.std(x_T))
    assert err[5] > err[20] > err[100] > err[500], err
    assert err[500] < 1e-3 * float(jnp.var(x0)), err
    # The latents approach the standard-normal prior as the ODE is solved more finely.
    assert spread[5] < spread[20] < spread[100] < spread[500] and abs(spread[500] - 1) < 0.05, spread


def test_trajectory_clipping_and_thresholding():
    wide = dj.GaussianMixture(np.array([[3.0, -3.0], [-2.0, 2.5]]), 0.2)  # data far outside [-1, 1]
    x_T = jax.random.normal(jax.random.key(0), (32, 2))
    x0, xs, x0s = dj.ddim_sample(wide.eps_fn(SCHED), SCHED, x_T, 10, return_trajectory=True)
    assert xs.shape == x0s.shape == (10, 32, 2)
    np.testing.assert_array_equal(xs[-1], x0)
    assert np.abs(x0).max() > 1.5
    for kw in ({"clip_x0": 1.0}, {"dynamic_threshold": 0.9}):
        y, _, y0s = dj.ddim_sample(wide.eps_fn(SCHED), SCHED, x_T, 10, return_trajectory=True, **kw)
        assert np.abs(y0s).max() <= 1.0 + 1e-6 and np.abs(y).max() <= 1.0 + 1e-6, kw


def test_sampler_and_encoder_compile_once_per_shape_and_S():
    traces = []

    def eps_fn(x, t):
        traces.append(x.shape)
        return 0.1 * x

    x = jnp.ones((4, 3))
    for eta in (0.0, 0.0):
        dj.ddim_sample(eps_fn, SCHED, x, 10, eta=eta)
    assert len(traces) == 1
    for eta in (0.3, 0.9):  # eta is an argument of the compiled program, not a constant
        dj.ddim_sample(eps_fn, SCHED, x, 10, eta=eta, key=jax.random.key(0))
    assert len(traces) == 2
    dj.ddim_sample(eps_fn, SCHED, x, 10, spacing="quadratic")  # same S, other tau: reused
    assert len(traces) == 2
    dj.ddim_sample(eps_fn, SCHED, x, 20)
    assert len(traces) == 3
    dj.ddim_encode(eps_fn, SCHED, x, 10)
    dj.ddim_encode(eps_fn, SCHED, x + 1, 10)
    assert len(traces) == 4
    # An oracle rebuilt with equal arrays is a cache hit too (its function object is shared).
    gm = _mixture()
    x = jnp.ones((4, gm.dim))
    size = dj.sampling._sample_scan._cache_size()
    dj.ddim_sample(gm.eps_fn(SCHED), SCHED, x, 10)
    dj.ddim_sample(_mixture().eps_fn(SCHED), SCHED, x, 10)
    assert dj.sampling._sample_scan._cache_size() == size + 1


def test_slerp():
    slerp = jax.jit(dj.slerp)  # one program per shape of alpha (op by op, each op would compile its own)
    z0 = np.asarray(jax.random.normal(jax.random.key(0), (8, 8, 3)))
    z1 = np.asarray(jax.random.normal(jax.random.key(1), (8, 8, 3)))
    z1 = z1 * np.linalg.norm(z0) / np.linalg.norm(z1)  # equal norms: a great-circle arc
    zs = np.asarray(slerp(z0, z1, np.linspace(0, 1, 5, dtype=np.float32)))
    assert zs.shape == (5, 8, 8, 3)
    np.testing.assert_allclose(zs[0], z0, atol=1e-5)
    np.testing.assert_allclose(zs[-1], z1, atol=1e-5)
    # Constant angular speed between consecutive points, and the norm is kept.
    ang = lambda a, b: np.arccos(np.sum(a * b) / np.linalg.norm(a) / np.linalg.norm(b))
    steps = [ang(zs[i], zs[i + 1]) for i in range(4)]
    np.testing.assert_allclose(steps, steps[0], rtol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(zs.reshape(5, -1), axis=1), np.linalg.norm(z0), rtol=1e-5)
    np.testing.assert_allclose(slerp(z0, 2 * z0, 0.5), 1.5 * z0, rtol=1e-5)  # parallel: linear


@pytest.mark.parametrize("kwargs,error,match", [
    ({"num_steps": 1001}, ValueError, "num_steps must be <= num_timesteps"),
    ({"num_steps": 0}, ValueError, "num_steps must be an integer >= 1"),
    ({"num_steps": 10, "eta": -0.1}, ValueError, "eta must be a finite real number >= 0"),
    ({"num_steps": 10, "eta": float("inf"), "key": jax.random.key(0)}, ValueError, "eta must be a finite real number >= 0"),
    ({"num_steps": 10, "eta": np.float32("inf"), "key": jax.random.key(0)}, ValueError, "eta must be a finite real"),
    ({"num_steps": 10, "eta": float("nan"), "key": jax.random.key(0)}, ValueError, "eta must be a finite real"),
    ({"num_steps": 10, "eta": 0.5}, ValueError, "key .* is required"),
    ({"num_steps": 10, "spacing": "cubic"}, ValueError, "spacing must be one of"),
    ({"num_steps": 10, "prediction_type": "score"}, ValueError, "prediction_type must be one of"),
    ({"num_steps": 10, "clip_x0": -1.0}, ValueError, "clip_x0 must be None or a number"),
    ({"num_steps": 10, "dynamic_threshold": 1.5}, ValueError, "dynamic_threshold must be None or a number"),
    ({"timesteps": [5, 5, 10]}, ValueError, "timesteps must be a non-empty 1-D strictly increasing"),
    ({"timesteps": [0, 1000]}, ValueError, r"timesteps must be .* in \[0, 999\]"),
    ({}, ValueError, "num_steps is required"),
    ({"eps_fn": "unet"}, TypeError, "eps_fn must be callable"),
    ({"eps_fn": lambda x, t: x[:, :1], "num_steps": 10}, ValueError, r"eps_fn returned shape \(4, 1\)"),
    ({"x_T": jnp.float32(1.0), "num_steps": 10}, ValueError, r"x_T must be an array of shape \[batch"),
    ({"x_T": jnp.ones((4, 3), jnp.int32), "num_steps": 10}, ValueError, "x_T must be a floating-point array; got int32"),
    ({"x_T": np.ones((4, 3), np.int64), "num_steps": 10}, ValueError, "x_T must be a floating-point array; got int64"),
    ({"x_T": np.ones((4, 3), bool), "num_steps": 10}, ValueError, "x_T must be a floating-point array; got bool"),
    ({"schedule": np.ones(10), "num_steps": 10}, TypeError, "schedule must be a ddim_jax.Schedule"),
])
def test_bad_sampler_arguments(kwargs, error, match):
    args = {"eps_fn": lambda x, t: 0 * x, "schedule": SCHED, "x_T": jnp.ones((4, 3))}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        dj.ddim_sample(args.pop("eps_fn"), args.pop("schedule"), args.pop("x_T"), **args)
