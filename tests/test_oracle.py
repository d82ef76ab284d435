import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddim_jax as dj
from ddim_jax.oracle import mixture_posterior


def test_oracle_is_the_posterior_mean_of_the_noise():
    # E[eps | x_t] by brute force: draw (x_0, eps), bin by x_t in 1-D, average eps in each bin. All 20 bins
    # hold > 21,000 draws: each bin mean's std error is < 0.0031 (eps) and < 0.0037 (x0), so 4 sigma stays
    # under the 0.02 tolerance; measured max deviations 0.005 and 0.006 (0.004, 0.005 with 2,000,000 draws).
    gm = dj.GaussianMixture(np.array([[-0.6], [0.5]]), np.array([0.1, 0.2]), weights=np.array([0.3, 0.7]))
    a = 0.4
    n = 1_000_000
    # The draws on the device, then on the host (op by op, each jax op would compile a program of its own).
    x0 = np.asarray(gm.sample(jax.random.key(0), n))[:, 0]
    eps = np.asarray(jax.random.normal(jax.random.key(1), (n, 1)))[:, 0]
    xt = np.float32(np.sqrt(a)) * x0 + np.float32(np.sqrt(1 - a)) * eps
    edges = np.linspace(-1.0, 1.0, 21)
    idx = np.digitize(xt, edges)  # bins 1 .. 20 lie inside the edges
    count = np.bincount(idx, minlength=len(edges) + 1)[1:len(edges)]
    kept = count > 10_000
    centers, means, x0_means = (np.bincount(idx, v, minlength=len(edges) + 1)[1:len(edges)][kept] / count[kept]
                                for v in (xt, eps, x0))
    oracle = jax.jit(lambda c: (gm.eps(c, a), gm.x0(c, a)))  # one program for both
    eps_hat, x0_hat = oracle(np.asarray(centers, np.float32)[:, None])
    np.testing.assert_allclose(eps_hat[:, 0], means, atol=0.02)
    np.testing.assert_allclose(x0_hat[:, 0], x0_means, atol=0.02)


def test_isotropic_fast_path_equals_the_general_formula():
    rng = np.random.default_rng(0)
    means = jnp.asarray(rng.uniform(-1, 1, (5, 7)), jnp.float32)
    stds = jnp.asarray(rng.uniform(0.05, 0.3, (5, 1)), jnp.float32)
    weights = jnp.asarray(rng.dirichlet(np.ones(5)), jnp.float32)
    x = jax.random.normal(jax.random.key(0), (9, 7))
    a = jnp.linspace(0.01, 0.99, 9)
    posterior = jax.jit(mixture_posterior)  # one program per formula
    fast = posterior(means, stds, weights, x, a)
    general = posterior(means, jnp.broadcast_to(stds, means.shape), weights, x, a)
    for f, g in zip(fast, general):
        np.testing.assert_allclose(f, g, rtol=1e-4, atol=1e-5)


def test_mixture_moments_and_samples():
    gm = dj.GaussianMixture(np.array([[1.0, 0.0], [-1.0, 2.0]]), np.array([[0.1, 0.2], [0.3, 0.1]]),
                            weights=np.array([1.0, 3.0]))
    x = np.asarray(gm.sample(jax.random.key(0), 200_000))
    assert gm.sample(jax.random.key(0), jnp.int32(3)).shape == (3, 2)  # any integer n, a JAX scalar too
    np.testing.assert_allclose(x.mean(0), gm.mean(), atol=0.01)
    np.testing.assert_allclose(np.cov(x.T), gm.cov(), atol=0.01)
    with pytest.raises(ValueError, match=r"means must have shape \[K, D\]"):
        dj.GaussianMixture(np.zeros(3))
    with pytest.raises(ValueError, match="weights must be 2 non-negative"):
        dj.GaussianMixture(np.zeros((2, 3)), weights=np.array([1.0, -1.0]))


def test_energy_distance_separates_distributions():
    x = jax.random.normal(jax.random.key(0), (2000, 3))
    y = jax.random.normal(jax.random.key(1), (2000, 3))
    assert abs(float(dj.energy_distance(x, y))) < 0.01
    # For N(0, I) against N(m, I) in 1-D the energy distance has a closed form.
    m = 1.0
    from math import erf, exp, pi, sqrt
    # E|X - Y| for X - Y ~ N(m, 2): sqrt(2) * sqrt(2/pi) exp(-m^2/4) + m erf(m/2); E|X - X'| = 2/sqrt(pi).
    exy = 2.0 / sqrt(pi) * exp(-m * m / 4) + m * erf(m / 2)
    expected = 2 * exy - 2 * (2 / sqrt(pi))
    x1 = jax.random.normal(jax.random.key(2), (4000, 1))
    y1 = jax.random.normal(jax.random.key(3), (4000, 1)) + m
    np.testing.assert_allclose(float(dj.energy_distance(x1, y1)), expected, rtol=0.05)
