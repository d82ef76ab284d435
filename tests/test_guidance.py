import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddim_jax as dj

SCHED = dj.make_schedule("linear", 1000)
N = 4000  # samples per run: the sample mean is within ~4 s / sqrt(N) and the std within ~4 s / sqrt(2N)


def _two_gaussians(mu=2.0, s=(0.3, 0.5)):
    return dj.GaussianMixture(np.array([[-mu, 0.5], [mu, -0.5]]), np.array(s))


def _x_T(d, n=N, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, d))


def _component_eps(gm, k, x, a):
    # Closed form: the noise prediction of the single Gaussian N(mu_k, s_k^2 I).
    var = a * gm.stds[k] ** 2 + 1 - a
    return np.sqrt(1 - a) * (np.asarray(x) - np.sqrt(a) * gm.means[k]) / var


@pytest.mark.parametrize("prediction_type", dj.PREDICTION_TYPES)
def test_scale_one_is_the_conditional_model_and_scale_zero_the_unconditional(prediction_type):
    gm = _two_gaussians()
    model = gm.conditional_eps_fn(SCHED, prediction_type)
    x = _x_T(2, 16)
    t = jnp.arange(16, dtype=jnp.int32) * 60
    labels = jnp.arange(16, dtype=jnp.int32) % 2
    calls = []

    def counting(x, t, labels):
        calls.append(x.shape)
        return model(x, t, labels)

    @jax.jit
    def outputs(x, t):  # every model output below in one program (op by op, each op would compile its own)
        return (model(x, t, labels), dj.guided(model, labels, 1.0, null_label=2)(x, t),
                dj.guided(model, labels, 0.0, null_label=2)(x, t), gm.eps_fn(SCHED, prediction_type)(x, t),
                dj.guided(counting, labels, 2.5, null_label=2)(x, t), model(x, t, jnp.full((16,), 2)))

    cond, one, zero, unconditional, out, unc = outputs(x, t)
    np.testing.assert_allclose(one, cond, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(zero, unconditional, rtol=1e-5, atol=1e-5)
    if prediction_type == "epsilon":  # label k is component k alone, in closed form
        a = np.asarray(SCHED.alphas_cumprod)[np.asarray(t)][:, None]
        ref = np.where(np.asarray(labels)[:, None] == 0, _component_eps(gm, 0, x, a), _component_eps(gm, 1, x, a))
        np.testing.assert_allclose(cond, ref, rtol=1e-4, atol=1e-5)
    # uncond + scale (cond - uncond), from one batched call of the model
    np.testing.assert_allclose(out, unc + 2.5 * (cond - unc), rtol=1e-5, atol=1e-5)
    assert calls == [(32, 2)]


def test_scale_one_samples_the_component_and_scale_zero_the_mixture():
    gm = _two_gaussians()
    model = gm.conditional_eps_fn(SCHED)
    x_T = _x_T(2)
    for k in (0, 1):
        x = np.asarray(dj.ddim_sample(dj.guided(model, k, 1.0, null_label=2), SCHED, x_T, 100))
        s = float(gm.stds[k, 0])
        # 100 DDIM steps shrink the std by ~3% (discretisation): allowed for on top of sampling error
        np.testing.assert_allclose(x.mean(0), gm.means[k], atol=4 * s / math.sqrt(N) + 0.005)
        np.testing.assert_allclose(x.std(0), s, atol=4 * s / math.sqrt(2 * N) + 0.04 * s)
    x = dj.ddim_sample(dj.guided(model, 0, 0.0, null_label=2), SCHED, x_T, 100)
    data = gm.sample(jax.random.key(1), N)
    ed = float(dj.energy_distance(x, data))
    ed_self = float(dj.energy_distance(gm.sample(jax.random.key(2), N), data))
    assert abs(ed) < 0.01 and abs(ed_self) < 0.01, (ed, ed_self)
    ed_cond = float(dj.energy_distance(dj.ddim_sample(dj.guided(model, 0, 1.0, null_label=2), SCHED, x_T, 100), data))
    assert ed_cond > 0.5  # the distance does separate the class from the mixture


def test_larger_scales_sharpen_and_push_away_from_the_other_class():
    # 1-D, two overlapping classes at -1 and +1 (std 0.5): with the same x_T, scale 1 (the
    # conditional model) puts some samples of class 0 past the midpoint; scales 2, 3, 5 move the
    # mean away from class 1 and shrink the spread monotonically.
    gm = dj.GaussianMixture(np.array([[-1.0], [1.0]]), 0.5)
    model = gm.conditional_eps_fn(SCHED)
    x_T = _x_T(1)
    stats = []
    for w in (1.0, 2.0, 3.0, 5.0):
        x = np.asarray(dj.ddim_sample(dj.guided(model, 0, w, null_label=2), SCHED, x_T, 50))[:, 0]
        stats.append((x.mean(), x.std(), (x > 0).mean()))
    means, stds, past = map(np.array, zip(*stats))
    assert np.all(np.diff(means) < -0.1) and np.all(np.diff(stds) < -0.02), stats
    assert past[0] > 0.005 and past[2] == 0.0, stats


def test_guidance_between_two_gaussians_matches_the_closed_form():
    # With a Gaussian class N(mu, s^2) and a Gaussian "unconditional" model N(0, S^2) (component 1
    # of the oracle, used as the null label), the guided eps is affine in x, each DDIM step is an
    # affine map, and the samples are exactly Gaussian with a mean and std propagated here in float64.
    mu, s, S = 1.5, 0.4, 1.2
    gm = dj.GaussianMixture(np.array([[mu], [0.0]]), np.array([s, S]))
    model = gm.conditional_eps_fn(SCHED)
    steps = 50
    ts = dj.make_timesteps(1000, steps, "uniform")[::-1]
    a_t = np.asarray(SCHED.alpha_bar(ts), np.float64)
    a_p = np.asarray(SCHED.alpha_bar(np.concatenate([ts[1:], [-1]])), np.float64)
    x_T = _x_T(1)
    for w in (1.0, 3.0):
        m, sd = 0.0, 1.0
        for a, ap in zip(a_t, a_p):
            vc, vu = a * s**2 + 1 - a, a * S**2 + 1 - a
            c1 = np.sqrt(1 - a) * ((1 - w) / vu + w / vc)  # eps = c1 x + c0
            c0 = -np.sqrt(1 - a) * w * np.sqrt(a) * mu / vc
            A = np.sqrt(ap / a) * (1 - np.sqrt(1 - a) * c1) + np.sqrt(1 - ap) * c1
            b = c0 * (np.sqrt(1 - ap) - np.sqrt(ap * (1 - a) / a))
            m, sd = A * m + b, abs(A) * sd
        x = np.asarray(dj.ddim_sample(dj.guided(model, 0, w, null_label=1), SCHED, x_T, steps))[:, 0]
        assert abs(x.mean() - m) < 4 * sd / math.sqrt(N), (w, x.mean(), m)
        assert abs(x.std() - sd) < 4 * sd / math.sqrt(2 * N), (w, x.std(), sd)
        if w == 1.0:
            np.testing.assert_allclose([m, sd], [mu, s], rtol=0.08)  # 50 DDIM steps: std 7% short
        else:  # guidance moved the class away from the unconditional mean and narrowed it
            assert m > mu + 0.1 and sd < s - 0.05, (m, sd)


def test_dpmpp_2m_and_v_prediction():
    gm = _two_gaussians()
    x_T = _x_T(2, 512)
    # scale 1 with any solver is the solver run on the component alone
    alone = dj.GaussianMixture(gm.means[:1], gm.stds[:1])
    ref = dj.sample(alone.eps_fn(SCHED), SCHED, x_T, 20, solver="dpmpp_2m")
    out = dj.sample(dj.guided(gm.conditional_eps_fn(SCHED), 0, 1.0, null_label=2), SCHED, x_T, 20, solver="dpmpp_2m")
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    # guidance on v (or x0) outputs is the same guided model as on eps: same samples at scale 3
    runs = {p: dj.sample(dj.guided(gm.conditional_eps_fn(SCHED, p), 0, 3.0, null_label=2), SCHED, x_T, 20,
                         solver="dpmpp_2m", prediction_type=p) for p in dj.PREDICTION_TYPES}
    np.testing.assert_allclose(runs["v"], runs["epsilon"], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(runs["x0"], runs["epsilon"], rtol=1e-3, atol=1e-3)
    assert float(jnp.mean(runs["epsilon"][:, 0])) < float(jnp.mean(out[:, 0])) - 0.05  # and it did guide


def test_rescale():
    gm = _two_gaussians()
    model = gm.conditional_eps_fn(SCHED, "v")
    x = _x_T(2, 8)
    t = jnp.full((8,), 700, jnp.int32)

    @jax.jit
    def outputs(x, t):  # the model outputs below in one program (op by op, each op would compile its own)
        return (model(x, t, jnp.zeros(8, jnp.int32)), dj.guided(model, 0, 4.0, null_label=2)(x, t),
                dj.guided(model, 0, 4.0, null_label=2, rescale=1.0)(x, t),
                dj.guided(model, 0, 4.0, null_label=2, rescale=0.7)(x, t))

    cond, g, rescaled, partly = map(np.asarray, outputs(x, t))
    full = g * cond.std(1, keepdims=True) / g.std(1, keepdims=True)
    np.testing.assert_allclose(rescaled, full, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(partly, 0.7 * full + 0.3 * g, rtol=1e-4, atol=1e-5)
    # 1-D data: the per-example std is 0, and the output is left as it is (finite); each output its own program
    gm1 = dj.GaussianMixture(np.array([[-1.0], [1.0]]), 0.3)
    m1 = gm1.conditional_eps_fn(SCHED)
    x1 = _x_T(1, 8)
    np.testing.assert_array_equal(jax.jit(dj.guided(m1, 0, 3.0, null_label=2, rescale=1.0))(x1, t),
                                  jax.jit(dj.guided(m1, 0, 3.0, null_label=2))(x1, t))


def test_scale_labels_and_rescale_do_not_recompile():
    gm = _two_gaussians()
    model = gm.conditional_eps_fn(SCHED)
    traces = []

    def counting(x, t, labels):
        traces.append(x.shape)
        return model(x, t, labels)

    x = _x_T(2, 8)
    outs = []
    for y, w, r in ((0, 1.0, 0.0), (1, 3.0, 0.0), (0, 7.5, 0.7), (1, 0.0, 1.0)):
        outs.append(dj.ddim_sample(dj.guided(counting, y, w, null_label=2, rescale=r), SCHED, x, 10))
    assert len(traces) == 1
    assert not np.allclose(outs[0], outs[1])
    labels = np.array([0, 1] * 4)
    for w in (2.0, 4.0):  # per-example labels: a new shape of y, one more trace, then reused
        dj.ddim_sample(dj.guided(counting, labels, w, null_label=2), SCHED, x, 10)
        dj.sample(dj.guided(counting, labels[::-1].copy(), w, null_label=2), SCHED, x, 10, solver="dpmpp_2m")
    assert len(traces) == 3


def test_bad_arguments():
    model = _two_gaussians().conditional_eps_fn(SCHED)
    for kw, msg in (({"scale": math.inf}, "scale must be a finite"), ({"scale": float("nan")}, "scale must be a finite"),
                    ({"scale": "3"}, "scale must be a finite"), ({"rescale": 1.5}, r"rescale must be a number in \[0, 1\]"),
                    ({"rescale": -0.1}, r"rescale must be a number in \[0, 1\]"), ({"y": np.zeros((2, 2), int)}, "y must be integer"),
                    ({"y": 0.5}, "y must be integer"), ({"null_label": 2.0}, "null_label must be an integer")):
        args = {"y": 0, "scale": 2.0, "null_label": 2} | kw
        with pytest.raises(ValueError, match=msg) as e:
            dj.guided(model, args.pop("y"), args.pop("scale"), **args)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="y has 3 labels but the batch x_t has 8") as e:
        dj.ddim_sample(dj.guided(model, np.array([0, 1, 0]), 2.0, null_label=2), SCHED, _x_T(2, 8), 5)
    assert "\n" not in str(e.value)
    with pytest.raises(TypeError, match="model_fn must be callable"):
        dj.guided(None, 0, 1.0, null_label=2)
    with pytest.raises(ValueError, match=r"null_label must be an integer outside \[0, 2\)"):
        _two_gaussians().conditional_eps_fn(SCHED, null_label=1)


def test_context_guidance_combines_the_prompt_and_the_null_context():
    from ddim_jax.guidance import guided_context

    def model_fn(x, t, c):  # any model whose output depends on its context row by row
        return x * jnp.mean(c, axis=(1, 2))[:, None] + t[:, None] * 0.01

    x = jnp.arange(6.0).reshape(3, 2)
    t = jnp.array([1, 2, 3])
    prompt, null = jnp.full((4, 5), 2.0), jnp.full((4, 5), 0.5)
    eps = guided_context(model_fn, prompt, 3.0, null_context=null)
    cond, uncond = model_fn(x, t, jnp.stack([prompt] * 3)), model_fn(x, t, jnp.stack([null] * 3))
    np.testing.assert_allclose(eps(x, t), uncond + 3.0 * (cond - uncond), rtol=1e-6)
    per_example = jnp.stack([prompt, null, prompt])  # one context per example
    np.testing.assert_allclose(guided_context(model_fn, per_example, 1.0, null_context=null)(x, t),
                               model_fn(x, t, per_example), rtol=1e-6)
    with pytest.raises(ValueError, match="null_context must be a float array"):
        guided_context(model_fn, prompt, 2.0, null_context=jnp.zeros((4,)))
    with pytest.raises(ValueError, match="context has non-finite values"):
        guided_context(model_fn, prompt.at[0, 0].set(jnp.nan), 2.0, null_context=null)
    with pytest.raises(ValueError, match="must have the same"):
        guided_context(model_fn, prompt, 2.0, null_context=jnp.zeros((3, 5)))
    with pytest.raises(ValueError, match="context has 2 rows but the batch x_t has 3"):
        guided_context(model_fn, per_example[:2], 2.0, null_context=null)(x, t)
    with pytest.raises(ValueError, match=r"model_fn returned shape \(6, 1\)"):
        guided_context(lambda x, t, c: x[:, :1], prompt, 2.0, null_context=null)(x, t)
