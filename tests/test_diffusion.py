import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddim_jax as dj


def test_forward_marginal_mean_and_variance():
    s = dj.make_schedule()
    x0 = jnp.array([0.7, -0.3, 0.0], jnp.float32)
    for t in (0, 250, 999):
        a = float(s.alphas_cumprod[t])
        noise = jax.random.normal(jax.random.key(t), (200_000, 3))
        xt = dj.q_sample(jnp.broadcast_to(x0, noise.shape), jnp.full(noise.shape[0], a), noise)
        np.testing.assert_allclose(xt.mean(0), np.sqrt(a) * x0, atol=5e-3)
        np.testing.assert_allclose(xt.var(0), 1 - a, rtol=2e-2, atol=1e-5)
        mean, std = dj.q_mean_std(x0[None], jnp.array([a]))
        np.testing.assert_allclose(mean[0], np.sqrt(a) * x0, rtol=1e-6)
        np.testing.assert_allclose(std, np.sqrt(1 - a), rtol=1e-6)


def test_prediction_conversions_agree_with_their_definitions():
    k1, k2 = jax.random.split(jax.random.key(0))
    x0 = jax.random.normal(k1, (4, 5))
    eps = jax.random.normal(k2, (4, 5))
    a = jnp.array([0.999, 0.5, 0.1, 0.0])
    xt = dj.q_sample(x0, a, eps)
    v = jnp.sqrt(a)[:, None] * eps - jnp.sqrt(1 - a)[:, None] * x0  # Salimans & Ho's definition
    np.testing.assert_allclose(dj.x0_eps_to_v(x0, eps, a), v, atol=1e-6)
    vx0, veps = dj.v_to_x0_eps(xt, v, a)  # finite and exact even where a = 0
    np.testing.assert_allclose(vx0, x0, atol=1e-5)
    np.testing.assert_allclose(veps, eps, atol=1e-5)
    np.testing.assert_allclose(dj.eps_to_x0(xt[:3], eps[:3], a[:3]), x0[:3], atol=1e-4)
    np.testing.assert_allclose(dj.x0_to_eps(xt[1:], x0[1:], a[1:]), eps[1:], atol=1e-5)


@pytest.mark.parametrize("prediction_type", dj.PREDICTION_TYPES)
def test_loss_is_zero_for_the_exact_model_and_one_for_a_blind_one(prediction_type):
    # With x_0 = 0, x_t = sqrt(1 - a) eps: the exact answers are known in closed form.
    s = dj.make_schedule("linear", 100)
    ab = jnp.asarray(s.alphas_cumprod)
    exact = {
        "epsilon": lambda x, t: x / jnp.sqrt(1 - ab[t])[:, None],
        "x0": lambda x, t: jnp.zeros_like(x),
        "v": lambda x, t: jnp.sqrt(ab[t] / (1 - ab[t]))[:, None] * x,
    }[prediction_type]
    x0 = jnp.zeros((4096, 8))
    loss, aux = dj.diffusion_loss(exact, s, x0, jax.random.key(1), prediction_type=prediction_type)
    assert float(loss) < 1e-8 and aux["t"].min() >= 0 and aux["t"].max() <= 99
    x0 = jnp.ones((4096, 8)) * 0.5
    zero = lambda x, t: jnp.zeros_like(x)
    loss, _ = dj.diffusion_loss(zero, s, x0, jax.random.key(1), prediction_type=prediction_type)
    expected = {"epsilon": 1.0, "x0": 0.25, "v": float(jnp.mean(ab + 0.25 * (1 - ab)))}[prediction_type]
    np.testing.assert_allclose(float(loss), expected, rtol=3e-2)


def test_loss_weighting_by_timestep():
    s = dj.make_schedule("linear", 10)
    zero = lambda x, t: jnp.zeros_like(x)
    x0 = jnp.zeros((8192, 4))
    only_t3 = jnp.zeros(10).at[3].set(10.0)  # gamma_t = 10 at t = 3, else 0
    loss, aux = dj.diffusion_loss(zero, s, x0, jax.random.key(2), weights=only_t3)
    frac = float(jnp.mean(aux["t"] == 3))
    np.testing.assert_allclose(float(loss), 10.0 * frac, rtol=5e-2)
    with pytest.raises(ValueError, match=r"weights must have shape \(10,\)"):
        dj.diffusion_loss(zero, s, x0, jax.random.key(2), weights=jnp.ones(9))
