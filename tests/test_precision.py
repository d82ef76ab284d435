"""Mixed precision (``training.compute_dtype``, ``sample.py --dtype``) and rematerialisation
(``training.remat``): what they change and what they must not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import leaves, random_params, tiny_config

from ddim_jax import data as data_lib
from ddim_jax import experiments as ex
from ddim_jax import models, training
from ddim_jax.config import spec_from_config
from ddim_jax.parallel import make_mesh
from ddim_jax.training.run import build


def _losses(config, steps):
    """Per-step losses of ``steps`` train steps of ``config`` from its initial state, on one device."""
    mesh = make_mesh(jax.devices()[:1])
    run = build(config)
    step = training.state.cached_train_step(run, mesh)
    src = data_lib.make_source(config.data)
    sharding = step.batch_sharding  # the training loop's: its program is the one train() compiles
    state, out = training.init_state(run, mesh), []
    for s in range(steps):
        batch = jax.device_put(data_lib.process_batch(src, config.training.batch_size, s, 0, 0, 1)[None], sharding)
        state, m = step(state, batch)
        out.append(float(m["loss"][0]))
    return np.array(out), state


def _conv_input_dtypes(net, params, x):
    jaxpr = jax.make_jaxpr(lambda p: net.apply({"params": p}, x, jnp.zeros((x.shape[0],), jnp.int32)))(params)
    return {str(e.invars[0].aval.dtype) for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"}


def test_bfloat16_training_tracks_float32():
    steps = 20  # the loss halves within them
    c32, c16 = tiny_config(), tiny_config(compute_dtype="bfloat16")  # c32's step is compiled once for the file
    l32, s32 = _losses(c32, steps)
    l16, s16 = _losses(c16, steps)
    # The network really ran in bfloat16 (its convolutions take bfloat16), with float32 parameters,
    # Adam state, EMA and loss.
    spec = spec_from_config(c16)
    x = jnp.zeros((2, 8, 8, 1))
    assert _conv_input_dtypes(spec.build("bfloat16"), s16.params, x) == {"bfloat16"}
    assert _conv_input_dtypes(spec.build(), s16.params, x) == {"float32"}
    assert {a.dtype for a in leaves((s16.params, s16.ema_params, s16.opt_state)) if a.dtype.kind == "f"} == {
        np.dtype("float32")}
    assert not np.array_equal(l16, l32)
    # It learns as float32 does: the same drop from the first steps to the last, step by step within a
    # few percent (bfloat16 keeps 8 bits of mantissa: ~0.4% per rounding).
    assert np.mean(l16[-10:]) < 0.6 * np.mean(l16[:5])
    np.testing.assert_allclose(l16, l32, rtol=0.1)
    assert abs(np.mean(l16[-10:]) / np.mean(l32[-10:]) - 1) < 0.05


def test_remat_gives_the_same_gradients_and_steps():
    spec = spec_from_config(tiny_config())
    spec = models.ModelSpec("unet", dict(spec.arch, attn_resolutions=(8,), dropout=0.3), 8, 1, spec.schedule)
    params = random_params(spec.param_shapes())  # any weights: no init to compile
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    t = jnp.array([0, 10, 50, 99])

    def grads(net):
        def loss(p):  # train=True: the dropout masks must be drawn again, alike, in the recomputation
            out = net.apply({"params": p}, x, t, train=True, rngs={"dropout": jax.random.key(2)})
            return jnp.mean(out ** 2)

        return jax.jit(jax.value_and_grad(loss)), loss

    (plain, plain_loss), (remat, remat_loss) = grads(spec.build()), grads(spec.build(remat=True))
    # remat is really on, and only when asked (the jaxpr has its primitive).
    assert "remat" in str(jax.make_jaxpr(remat_loss)(params)) and "remat" not in str(jax.make_jaxpr(plain_loss)(params))
    (l0, g0), (l1, g1) = plain(params), remat(params)
    assert float(l0) == pytest.approx(float(l1), rel=1e-6) and float(l0) > 0
    for a, b in zip(leaves(g0), leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # training.remat=True builds the train step's network with remat (traced, not compiled: the numbers
    # are the module's, checked above).
    c = build(tiny_config(remat=True))
    mesh = make_mesh(jax.devices()[:1])
    step = training.state.make_train_step(c, mesh)
    images = jnp.zeros((1, 16, 8, 8, 1), jnp.uint8)
    assert "remat" in str(jax.make_jaxpr(step)(training.state.abstract_state(c, mesh), images))


def test_sampling_models_compute_in_their_dtype():
    spec = spec_from_config(tiny_config())
    params = random_params(spec.param_shapes())  # any weights: no init to compile
    m32 = ex.Model(spec, params, make_mesh(jax.devices()[:1]))
    m16 = ex.Model(spec, params, make_mesh(jax.devices()[:1]), dtype="bfloat16")
    x = jax.random.normal(jax.random.key(3), (4, 8, 8, 1))
    t = jnp.array([0, 30, 60, 99])
    a, b = (np.asarray(jax.jit(lambda f: f(x, t))(m.eps_fn)) for m in (m32, m16))
    assert a.dtype == b.dtype == np.float32 and not np.array_equal(a, b)  # bf16 inside, float32 out
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
    with pytest.raises(ValueError, match="compute dtype must be one of float32, bfloat16; got 'float16'"):
        ex.Model(spec, params, make_mesh(jax.devices()[:1]), dtype="float16")
