"""Few-step distillation (ddim_jax.distillation, ddim_jax.training.distill) against independent truth: with the
exact Gaussian-mixture denoiser as the teacher, the progressive target and the consistency target equal a
float64 numpy computation of the papers' formulas; the consistency function's boundary condition holds exactly
(through a model's spec too); a student that outputs the progressive target reproduces the teacher's 2S-step
DDIM sample in S steps. Then tiny train.py runs of each objective export students that load and sample at
their own step count, and a progressive run resumed mid-run (in a later round) ends where an uninterrupted
one does."""

import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import leaves, tiny_config

from ddim_jax import distillation as dmath
from ddim_jax import experiments, loading, models, training
from ddim_jax.config import spec_from_config, validate_config
from ddim_jax.oracle import GaussianMixture
from ddim_jax.parallel import make_mesh
from ddim_jax.sampling import ddim_sample
from ddim_jax.schedules import make_schedule, make_timesteps

MIX = GaussianMixture(np.array([[0.6, -0.3, 0.2, 0.5], [-0.5, 0.4, -0.6, 0.1], [0.1, 0.7, 0.4, -0.6]]),
                      np.array([0.15, 0.25, 0.2]), np.array([0.5, 0.3, 0.2]))
SCHEDULE = make_schedule("cosine", num_timesteps=1000)


def np_x0(x, a):
    """E[x0 | x_t] of MIX in float64 numpy: per component N(sqrt(a) m, (a s^2 + 1 - a) I), Bayes' weights."""
    x, a = np.asarray(x, np.float64), np.asarray(a, np.float64)[:, None, None]
    m, s = MIX.means.astype(np.float64)[None], MIX.stds.astype(np.float64).reshape(1, -1, 1)
    var = a * s ** 2 + 1 - a
    d = x[:, None, :] - np.sqrt(a) * m
    logp = np.log(MIX.weights.astype(np.float64))[None] - 0.5 * np.sum(d ** 2 / var + np.log(var), axis=2)
    w = np.exp(logp - logp.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    post = m + np.sqrt(a) * s ** 2 / var * d
    return np.einsum("bk,bkd->bd", w, post)


def np_ddim(z, x0, a_from, a_to):
    a_from, a_to = np.asarray(a_from, np.float64)[:, None], np.asarray(a_to, np.float64)[:, None]
    return np.sqrt(a_to) * x0 + np.sqrt((1 - a_to) / (1 - a_from)) * (z - np.sqrt(a_from) * x0)


def jax_x0(x, t):
    return MIX.x0(x, SCHEDULE.alpha_bar(t))


def _points(n, grid_steps, seed):
    """``n`` noisy points at random student steps of a ``grid_steps``-step round: (z, t, t_mid, t_end)."""
    rng = np.random.default_rng(seed)
    grid = dmath.progressive_grid(1000, grid_steps)
    i = rng.integers(1, grid_steps + 1, n)
    t, t_mid, t_end = grid[2 * i], grid[2 * i - 1], grid[2 * i - 2]
    x0 = MIX.means[rng.integers(0, 3, n)] + 0.2 * rng.standard_normal((n, 4))
    a = SCHEDULE.alpha_bar(t).astype(np.float64)[:, None]
    z = (np.sqrt(a) * x0 + np.sqrt(1 - a) * rng.standard_normal((n, 4))).astype(np.float32)
    return z, t, t_mid, t_end


def test_progressive_grid_is_the_trailing_timesteps_every_other_one_the_students():
    for T, n in [(1000, 1), (1000, 4), (1000, 64), (100, 50), (999, 8)]:
        grid = dmath.progressive_grid(T, n)
        assert grid[0] == -1 and grid[-1] == T - 1 and len(grid) == 2 * n + 1 and np.all(np.diff(grid) > 0)
        np.testing.assert_array_equal(grid[1:], make_timesteps(T, 2 * n, "trailing"))
        np.testing.assert_array_equal(grid[2::2], make_timesteps(T, n, "trailing"))
    with pytest.raises(ValueError, match="num_steps must be <= num_timesteps / 2"):
        dmath.progressive_grid(100, 51)


@pytest.mark.parametrize("grid_steps", [1, 4, 32])
def test_progressive_target_is_the_papers_formula_in_numpy(grid_steps):
    z, t, t_mid, t_end = _points(256, grid_steps, grid_steps)
    ab = lambda t: SCHEDULE.alpha_bar(t).astype(np.float64)  # noqa: E731
    target, z_end = dmath.progressive_target(jax_x0, jnp.asarray(z), t, t_mid, t_end, SCHEDULE.alpha_bar(t),
                                             SCHEDULE.alpha_bar(t_mid), SCHEDULE.alpha_bar(t_end))
    # Salimans and Ho, Algorithm 2: two DDIM steps of the teacher, then x~ = (z'' - (s''/s) z) / (a'' - (s''/s) a).
    z64 = z.astype(np.float64)
    z1 = np_ddim(z64, np_x0(z64, ab(t)), ab(t), ab(t_mid))
    z2 = np_ddim(z1, np_x0(z1, ab(t_mid)), ab(t_mid), ab(t_end))
    ratio = np.sqrt((1 - ab(t_end)) / (1 - ab(t)))[:, None]
    want = (z2 - ratio * z64) / (np.sqrt(ab(t_end))[:, None] - ratio * np.sqrt(ab(t))[:, None])
    scale = np.abs(want).max()
    np.testing.assert_allclose(np.asarray(z_end), z2, rtol=0, atol=2e-5 * max(np.abs(z2).max(), 1))
    np.testing.assert_allclose(np.asarray(target), want, rtol=0, atol=3e-5 * max(scale, 1))
    # The student's one DDIM step with x~ lands on the teacher's two-step result.
    np.testing.assert_allclose(np_ddim(z64, np.asarray(target, np.float64), ab(t), ab(t_end)), z2, atol=3e-5)


def test_snr_weights():
    a = np.array([0.01, 0.5, 0.9, 0.999], np.float32)
    snr = a.astype(np.float64) / (1 - a)
    np.testing.assert_allclose(dmath.snr_weight(a, "truncated_snr"), np.maximum(snr, 1), rtol=1e-5)
    np.testing.assert_allclose(dmath.snr_weight(a, "snr_plus_one"), snr + 1, rtol=1e-5)
    with pytest.raises(ValueError, match="weighting"):
        dmath.snr_weight(a, "snr")


@pytest.mark.parametrize("student_steps", [1, 2, 4, 8])
def test_a_student_that_outputs_the_target_reproduces_the_teachers_2s_step_sample(student_steps):
    """In exact arithmetic the S-step student's sample is the teacher's 2S-step sample; in float32 each student
    step reproduces the teacher's z'' up to rounding of the division by (alpha'' - (sigma''/sigma) alpha) and the
    multiplication back, a few ulps of |z| per step."""
    S, T = student_steps, 1000
    grid = dmath.progressive_grid(T, S)
    where = {int(grid[2 * i]): i for i in range(1, S + 1)}
    x_T = jax.random.normal(jax.random.key(3), (512, 4), jnp.float32)

    def student(x, t):  # the exact target as the student's x-prediction at its own steps
        i = where[int(t[0])]
        ab = SCHEDULE.alpha_bar
        return dmath.progressive_target(jax_x0, x, t, grid[2 * i - 1], grid[2 * i - 2], ab(t), ab(grid[2 * i - 1]),
                                        ab(grid[2 * i - 2]))[0]

    x = x_T
    for t in grid[2::2][::-1]:  # the S student steps, unrolled (the student looks its step up on the host)
        tt = np.full((x.shape[0],), t, np.int32)
        x = dmath.ddim_to(x, student(x, tt), SCHEDULE.alpha_bar(tt), SCHEDULE.alpha_bar(grid[where[int(t)] * 2 - 2]))
    teacher = ddim_sample(MIX.eps_fn(SCHEDULE, "x0"), SCHEDULE, x_T, timesteps=grid[1:], prediction_type="x0")
    bound = 32 * np.finfo(np.float32).eps * S * float(np.abs(np.asarray(teacher)).max() + 1)  # 32 ulps a step
    err = float(np.abs(np.asarray(x) - np.asarray(teacher)).max())
    assert err <= bound, (err, bound)
    # Against the teacher at S steps (what the student's copy of the teacher would do), the 2S-step sample differs.
    coarse = ddim_sample(MIX.eps_fn(SCHEDULE, "x0"), SCHEDULE, x_T, timesteps=grid[2::2], prediction_type="x0")
    assert float(np.abs(np.asarray(coarse) - np.asarray(teacher)).max()) > 10 * bound


def test_consistency_boundary_is_exact():
    x = np.asarray(jax.random.normal(jax.random.key(0), (8, 4, 4, 1))) * 3
    junk = np.asarray(jax.random.normal(jax.random.key(1), (8, 4, 4, 1))) * 100
    # Each called as one jitted program (eager, each op would compile its own).
    static = ("t_min", "sigma_data", "scaling")
    output = jax.jit(dmath.consistency_output, static_argnames=static)
    coefficients = jax.jit(dmath.consistency_coefficients, static_argnames=static)
    for t_min in (0, 7):
        f = output(x, junk, np.full((8,), t_min, np.int32), t_min=t_min, sigma_data=0.5, scaling=10.0)
        np.testing.assert_array_equal(np.asarray(f), x)
        c_skip, c_out = coefficients(np.int32(t_min), t_min=t_min)
        assert float(c_skip) == 1.0 and float(c_out) == 0.0
    # Latent consistency models' coefficients (c_skip = s_d^2 / ((10 t)^2 + s_d^2), c_out = 10 t / sqrt(...)).
    t = np.array([1, 10, 500, 999])
    c_skip, c_out = coefficients(t)
    np.testing.assert_allclose(c_skip, 0.25 / ((10.0 * t) ** 2 + 0.25), rtol=1e-6)
    np.testing.assert_allclose(c_out, 10.0 * t / np.sqrt((10.0 * t) ** 2 + 0.25), rtol=1e-6)


def test_consistency_targets_are_the_papers_formulas_in_numpy():
    grid = dmath.consistency_grid(1000, 20)
    assert grid[0] == 0 and grid[-1] == 999 and len(grid) == 20
    rng = np.random.default_rng(0)
    n = rng.integers(0, 18, 128)
    x0 = MIX.means[rng.integers(0, 3, 128)]
    noise = rng.standard_normal((128, 4))
    ab = lambda t: SCHEDULE.alpha_bar(t).astype(np.float64)  # noqa: E731

    def np_f(x, t):  # the consistency function of the exact denoiser
        s = 10.0 * t.astype(np.float64)
        return (0.25 / (s ** 2 + 0.25))[:, None] * x + (s / np.sqrt(s ** 2 + 0.25))[:, None] * np_x0(x, ab(t))

    def jax_f(x, t):
        return dmath.consistency_output(x, jax_x0(x, t), t)

    # DDIM: x^_n from x_{n+1}, target f(x^_n, t_n).
    t_n, t_up, t_far = grid[n], grid[n + 1], grid[n + 2]
    x_up = (np.sqrt(ab(t_up))[:, None] * x0 + np.sqrt(1 - ab(t_up))[:, None] * noise)
    want = np_f(np_ddim(x_up, np_x0(x_up, ab(t_up)), ab(t_up), ab(t_n)), t_n)

    @jax.jit  # both targets in float32, in one program (eager, each op would compile its own)
    def ours(xu, xf):
        got = jax_f(dmath.ddim_to(xu, jax_x0(xu, t_up), SCHEDULE.alpha_bar(t_up), SCHEDULE.alpha_bar(t_n)), t_n)
        g_near, g_to = dmath.teacher_step_2m(jax_x0, xf, t_far, t_up, t_n, SCHEDULE.alpha_bar(t_far),
                                             SCHEDULE.alpha_bar(t_up), SCHEDULE.alpha_bar(t_n))
        return got, g_near, g_to, jax_f(g_to, t_n)

    x_far = (np.sqrt(ab(t_far))[:, None] * x0 + np.sqrt(1 - ab(t_far))[:, None] * noise)
    got, g_near, g_to, f_to = ours(x_up.astype(np.float32), x_far.astype(np.float32))
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=3e-5)
    # DPM-Solver++ (2M): a DDIM step t_far -> t_up, then the two-point step to t_n (Lu et al. 2022, Algorithm 2).
    d0 = np_x0(x_far, ab(t_far))
    x_near = np_ddim(x_far, d0, ab(t_far), ab(t_up))
    d1 = np_x0(x_near, ab(t_up))
    lam = lambda a: np.log(np.sqrt(a) / np.sqrt(1 - a))  # noqa: E731
    h, h0 = lam(ab(t_n)) - lam(ab(t_up)), lam(ab(t_up)) - lam(ab(t_far))
    r = (h0 / h)[:, None]
    d = (1 + 1 / (2 * r)) * d1 - 1 / (2 * r) * d0
    x_to = (np.sqrt(1 - ab(t_n)) / np.sqrt(1 - ab(t_up)))[:, None] * x_near - (
        np.sqrt(ab(t_n)) * (np.exp(-h) - 1))[:, None] * d
    np.testing.assert_allclose(np.asarray(g_near), x_near, atol=3e-5)
    np.testing.assert_allclose(np.asarray(g_to), x_to, atol=5e-5)
    np.testing.assert_allclose(np.asarray(f_to), np_f(x_to, t_n), atol=5e-5)


def test_metrics():
    a = np.random.default_rng(0).standard_normal((3, 4, 4, 2)).astype(np.float32)
    b = np.zeros_like(a)
    sq = np.sum(a.reshape(3, -1).astype(np.float64) ** 2, axis=1)
    np.testing.assert_allclose(dmath.metric(a, b, "l2"), sq / 32, rtol=1e-5)
    c = 0.00054 * np.sqrt(32)
    np.testing.assert_allclose(dmath.metric(a, b, "pseudo_huber"), np.sqrt(sq + c * c) - c, rtol=1e-5)
    with pytest.raises(ValueError, match="metric"):
        dmath.metric(a, b, "lpips")


def test_consistency_sampling_is_denoise_then_renoise():
    """Multistep sampling: x = f(x_T, tau_S), then noise to each next tau and denoise (Song et al., Algorithm 1)."""
    x_T = jax.random.normal(jax.random.key(0), (64, 4))
    f = lambda x, t: dmath.consistency_output(x, jax_x0(x, t), t)  # noqa: E731
    key = jax.random.key(5)
    tau = np.array([250, 999])
    got = dmath.consistency_sample(f, SCHEDULE, x_T, tau, key)

    @jax.jit  # the algorithm by hand, in one program (eager, each op would compile its own)
    def by_hand(x_T, key):
        x = f(x_T, jnp.full((64,), 999))
        a = SCHEDULE.alpha_bar(250)
        z = jax.random.normal(jax.random.fold_in(key, 1), x.shape)
        return f(jnp.sqrt(a) * x + jnp.sqrt(1 - a) * z, jnp.full((64,), 250)), x

    want, first = by_hand(x_T, key)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    one = dmath.consistency_sample(f, SCHEDULE, x_T, tau[1:])
    np.testing.assert_allclose(np.asarray(one), np.asarray(first), atol=1e-6)
    with pytest.raises(ValueError, match="key"):
        dmath.consistency_sample(f, SCHEDULE, x_T, tau)


# ---------------------------------------------------------------------------------------------
# The objectives through train.py's code path.


def _teacher_config():
    c = tiny_config()
    c.diffusion.schedule = "linear"
    return c


def train(config, workdir):
    """train.py's code path on one device (the train step's multi-device paths are tested in test_training)."""
    return training.train(config, str(workdir), progress=False, devices=jax.devices()[:1])


def distill_config(teacher, method, **distill):
    c = tiny_config(batch_size=8, warmup_steps=1, log_every=2, checkpoint_every=2, sample_every=0)
    c.training.distill.update(method=method, teacher=str(teacher), **distill)
    return c


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A model directory: the tiny UNet at random weights (a teacher's weights need not be good to be copied)."""
    root = tmp_path_factory.mktemp("distill")
    spec = spec_from_config(_teacher_config())
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32), spec.param_shapes())
    models.save(str(root / "teacher"), spec, params)
    return root, spec, params


def test_config_checks_name_the_field(teacher):
    root, _, _ = teacher
    bad = [
        (dict(method="progressive", steps=6, final_steps=1, round_steps=2), "training.distill.steps"),
        (dict(method="progressive", steps=4, final_steps=1, round_steps=2), "training.num_steps"),
        (dict(method="progressive", steps=4, final_steps=1, round_steps=2, prediction_type="epsilon"),
         "training.distill.prediction_type"),
        (dict(method="consistency", steps=1), "training.distill.steps"),
        (dict(method="consistency", steps=10, metric="lpips"), "training.distill.metric"),
        (dict(method="consistency", steps=10, solver="heun"), "training.distill.solver"),
        (dict(method="distill"), "training.distill.method"),
    ]
    for fields, name in bad:
        c = distill_config(root / "teacher", **fields)
        c.training.num_steps = 8 if name == "training.num_steps" else 6
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            validate_config(c)
    c = distill_config("", "consistency", steps=10)
    with pytest.raises(ValueError, match=r"training\.distill\.teacher"):
        validate_config(c)


@pytest.fixture(scope="module")
def progressive_run(teacher):
    root, _, _ = teacher
    c = distill_config(root / "teacher", "progressive", steps=4, final_steps=1, round_steps=2)
    c.training.num_steps = 6
    workdir = root / "progressive"
    result = train(c, workdir)
    return c, workdir, result


def test_progressive_run_exports_each_rounds_student_at_its_step_count(teacher, progressive_run):
    root, t_spec, t_params = teacher
    c, workdir, result = progressive_run
    assert result.steps_run == 6
    for n in (4, 2, 1):
        spec, params = models.load(str(workdir / "rounds" / f"steps_{n}"))
        assert spec.prediction_type == "v" and spec.distilled["method"] == "progressive"
        assert spec.distilled["steps"] == n and spec.distilled["spacing"] == "trailing"
        assert list(spec.distilled["timesteps"]) == make_timesteps(100, n, "trailing").tolist()
        assert spec.architecture() == t_spec.architecture()
    spec, _ = loading.load(str(workdir))
    assert spec.distilled["steps"] == 1
    # The student started as the teacher's copy: its first round moved it only a little.
    _, first = models.load(str(workdir / "rounds" / "steps_4"))
    diff = max(float(np.abs(a - b).max()) for a, b in zip(leaves(first), leaves(t_params)))
    assert 0 < diff < 0.5
    # Sampled by default at its own count, on its own timesteps: DDIM over trailing tau equals decode's default.
    model = experiments.Model(*models.load(str(workdir / "rounds" / "steps_2")), make_mesh(jax.devices()[:1]))
    x_T = experiments.latents(model, 0, 4, 0)
    got = experiments.decode(model, x_T, 2)
    want = ddim_sample(model.eps_fn, model.schedule, x_T, timesteps=make_timesteps(100, 2, "trailing"),
                       prediction_type="v", clip_x0=1.0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_progressive_run_resumes_in_a_later_round(teacher, progressive_run, tmp_path):
    """A run stopped after round 1 resumes in round 2 with round 1's exported student as its teacher and ends
    where the uninterrupted run ended."""
    c, workdir, result = progressive_run
    copy = tmp_path / "resumed"
    shutil.copytree(workdir, copy)
    for step in os.listdir(copy / "checkpoints"):
        if step.isdigit() and int(step) > 2:
            shutil.rmtree(copy / "checkpoints" / step)
    shutil.rmtree(copy / "rounds" / "steps_2")
    shutil.rmtree(copy / "rounds" / "steps_1")
    again = train(c, copy)
    assert again.steps_run == 4
    for a, b in zip(leaves(again.state.params), leaves(result.state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert models.is_model_dir(str(copy / "rounds" / "steps_1"))


def test_consistency_run_exports_a_one_and_multistep_model(teacher, tmp_path):
    root, t_spec, t_params = teacher
    c = distill_config(root / "teacher", "consistency", steps=10, solver="dpmpp_2m", sample_steps=2)
    c.training.update(num_steps=2, ema_decay=0.95, ema_warmup=False)
    result = train(c, tmp_path / "cd")
    assert result.steps_run == 2
    spec, params = loading.load(str(tmp_path / "cd"))
    assert spec.is_consistency and spec.prediction_type == "x0" and spec.distilled["steps"] == 2
    assert spec.distilled["network_prediction"] == "v" != t_spec.prediction_type  # the student's own output
    # The boundary condition through the spec's eps_fn (the model's: spec.eps_fn of its params): f(x, t_min) = x
    # exactly. (eps_fn is a pytree: one compiled call serves both checks below.)
    call = jax.jit(lambda f, x, t: f(x, t))
    model = experiments.Model(spec, params, make_mesh(jax.devices()[:1]))
    x_T = experiments.latents(model, 0, 4, 0)
    f = model.eps_fn
    np.testing.assert_array_equal(np.asarray(call(f, x_T, jnp.zeros((4,), jnp.int32))), np.asarray(x_T))
    one = experiments.decode(model, x_T, 1, key=jax.random.key(1))
    np.testing.assert_allclose(np.asarray(one),
                               np.clip(np.asarray(call(f, x_T, jnp.full((4,), 99, jnp.int32))), -1, 1), atol=1e-6)
    two = experiments.decode(model, x_T, 2, key=jax.random.key(1))
    assert np.all(np.isfinite(np.asarray(two))) and not np.allclose(np.asarray(two), np.asarray(one))
    # A consistency model is no teacher.
    bad = distill_config(tmp_path / "cd", "consistency", steps=10)
    with pytest.raises(ValueError, match="consistency model"):
        train(bad, tmp_path / "cd2")


def test_student_spec_round_trips_and_checks(teacher):
    _, t_spec, _ = teacher
    rec = dict(method="consistency", steps=1, spacing="trailing", sigma_data=0.5, timestep_scaling=10.0, t_min=0,
               network_prediction="epsilon")
    spec = dataclasses.replace(t_spec, prediction_type="x0", distilled=rec)
    assert models.ModelSpec.from_dict(spec.to_dict()) == spec
    assert "distilled" not in t_spec.to_dict()
    with pytest.raises(ValueError, match="prediction_type is 'x0'"):
        dataclasses.replace(t_spec, distilled=rec)
    with pytest.raises(ValueError, match=r"distilled\.steps"):
        dataclasses.replace(spec, distilled=dict(rec, steps=0))
    with pytest.raises(ValueError, match="distilled must be"):
        dataclasses.replace(spec, distilled=dict(rec, method="lcm"))
