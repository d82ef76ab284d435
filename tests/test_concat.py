"""Conditioning by concatenation: the observations against their definitions computed here, the network
input against a hand-made concatenation (unguided and guided), the training loss against the diffusion
loss on that input, and a tiny super-resolution run end to end (preview, export, sample.py, refusals)."""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_params, tiny_config

from ddim_jax import concat, loading, models, training
from ddim_jax import experiments as ex
from ddim_jax.config import validate_config
from ddim_jax.data import load_digits
from ddim_jax.diffusion import per_example_loss
from ddim_jax.training.run import build

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sample  # noqa: E402

UNET = {"ch": 8, "ch_mult": (1,), "num_res_blocks": 1, "norm_groups": 4}
SCHEDULE = {"name": "cosine", "num_timesteps": 100}


def images(n=4, side=8, channels=1, seed=0):
    return jax.random.uniform(jax.random.key(seed), (n, side, side, channels), minval=-1, maxval=1)


def test_observations_are_their_definitions():
    x = np.asarray(images(2, 8, 3))
    low = np.asarray(concat.get("superres2x").observe(x))
    want = np.array([[[x[n, 2 * i:2 * i + 2, 2 * j:2 * j + 2, c].mean() for c in range(3)] for j in range(4)]
                     for i in range(4) for n in [0]]).reshape(4, 4, 3)
    np.testing.assert_allclose(low[0], want, rtol=1e-6, atol=1e-6)
    flat = np.full((1, 4, 4, 3), 0.25, np.float32)  # resizing keeps a constant image constant
    np.testing.assert_allclose(concat.get("superres2x").condition(flat, 8), np.full((1, 8, 8, 3), 0.25), atol=1e-6)
    seen = np.asarray(concat.get("inpaint_center").observe(x))
    assert seen.shape == (2, 8, 8, 4)
    mask = np.ones((8, 8))
    mask[2:6, 2:6] = 0  # the centre half of an 8x8 image
    np.testing.assert_array_equal(seen[..., 3], np.broadcast_to(mask, (2, 8, 8)))
    np.testing.assert_array_equal(seen[..., :3], x * mask[None, :, :, None])
    with pytest.raises(ValueError, match="concat must be one of"):
        concat.get("superres3x")


def test_spec_round_trips_and_refuses_bad_concat():
    spec = models.ModelSpec("unet", UNET, 8, 1, SCHEDULE, concat="inpaint_center")
    assert spec.input_channels == 3  # x_t, the masked image, the mask
    assert models.ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.architecture()["concat"] == "inpaint_center"
    assert "concat" not in models.ModelSpec("unet", UNET, 8, 1, SCHEDULE).to_dict()  # older spec.json unchanged
    assert spec.param_shapes()["conv_in"]["kernel"].shape[2] == 3
    with pytest.raises(ValueError, match="concat must be one of"):
        models.ModelSpec("unet", UNET, 8, 1, SCHEDULE, concat="colorize")
    ae = dict(block_out_channels=(8, 8), layers_per_block=1, latent_channels=2, norm_groups=4)
    with pytest.raises(ValueError, match="concat applies to diffusion models"):
        models.ModelSpec("autoencoder_kl", ae, 8, 1, None, None, concat="superres2x")
    # A latent model's condition lives at the latents' side, from observations of its 8x8 images.
    lat = models.ModelSpec("unet", UNET, 4, 2, SCHEDULE, autoencoder=models.ModelSpec("autoencoder_kl", ae, 8, 1,
                           None, None), scale_factor=1.0, concat="superres2x")
    assert lat.input_channels == 3 and lat.condition(lat.observe(images())).shape == (4, 4, 4, 1)
    c = validate_config_error(concat="sharpen")
    assert "diffusion.concat" in c


def validate_config_error(**diffusion):
    cfg = tiny_config()
    cfg.diffusion.update(diffusion)
    with pytest.raises(ValueError) as e:
        validate_config(cfg, 1, 1)
    return str(e.value)


def test_eps_fn_feeds_the_network_x_t_and_the_condition():
    spec = models.ModelSpec("unet", UNET, 8, 1, SCHEDULE, num_classes=10, null_label=10, concat="superres2x")
    params = random_params(spec.param_shapes())  # not DDPM's init: its zero output conv would hide the input
    x, t, y = images(4, seed=1), jnp.array([1, 30, 60, 99]), jnp.array([0, 3, 5, 9])
    c = spec.condition(spec.observe(images(4, seed=2)))
    apply = jax.jit(spec.build().apply)
    call = jax.jit(lambda f, x, t: f(x, t))  # eps_fn is a pytree: one compiled call for each of its structures

    def by_hand(labels):
        return apply({"params": params}, jnp.concatenate([x, c], -1), t, labels)

    np.testing.assert_allclose(call(spec.eps_fn(params, y, concat=c), x, t), by_hand(y), rtol=1e-5, atol=1e-6)
    uncond, cond = by_hand(jnp.full(4, 10)), by_hand(y)
    np.testing.assert_allclose(call(spec.eps_fn(params, y, 3.0, concat=c), x, t), uncond + 3.0 * (cond - uncond),
                               rtol=1e-4, atol=1e-5)
    other = call(spec.eps_fn(params, y, concat=spec.condition(spec.observe(images(4, seed=5)))), x, t)
    assert np.abs(np.asarray(other) - np.asarray(cond)).max() > 1e-3  # the condition reaches the output
    with pytest.raises(ValueError, match=r"conditioned by concatenation \(superres2x\): give concat="):
        spec.eps_fn(params, y)
    with pytest.raises(ValueError, match=r"concat must be \[B, 8, 8, 1\]"):
        spec.eps_fn(params, y, concat=spec.observe(x))  # the 4x4 observation, not the condition
    plain = models.ModelSpec("unet", UNET, 8, 1, SCHEDULE)
    with pytest.raises(ValueError, match="concat applies to concat-conditioned models only"):
        plain.eps_fn(random_params(plain.param_shapes()), concat=c)


def test_loss_is_the_diffusion_loss_on_the_concatenated_input():
    cfg = tiny_config()
    cfg.diffusion.concat = "superres2x"
    obj = build(cfg).objective
    params = random_params(jax.eval_shape(obj.init, jax.random.key(0)))
    x0 = images(4, seed=4)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(5), i))(jnp.arange(4))
    got = jax.jit(lambda p: obj.loss(p, {}, x0, None, keys, 0, jax.random.key(0))[0])(params)
    c = concat.resize(concat.box_downsample(x0, 2), 8)
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, 100, jnp.int32))(jax.vmap(jax.random.fold_in, (0, None))(
        keys, 0))
    noise = jax.vmap(lambda k: jax.random.normal(k, (8, 8, 1)))(jax.vmap(jax.random.fold_in, (0, None))(keys, 1))
    net = obj.spec.build()
    want = jax.jit(lambda p: per_example_loss(lambda x, tt: net.apply({"params": p}, jnp.concatenate([x, c], -1), tt),
                                              obj.schedule, x0, t, noise).mean())(params)
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = tiny_config(num_steps=2, checkpoint_every=2, sample_every=2)
    cfg.diffusion.concat = "superres2x"
    workdir = tmp_path_factory.mktemp("concat") / "run"
    training.train(cfg, str(workdir), progress=False, devices=jax.devices()[:1])
    return workdir


def test_a_superresolution_run_previews_exports_and_samples(run, tmp_path, capsys):
    assert (run / "samples" / "step_00000002.png").exists()  # the preview drew from training images
    spec, _ = loading.load(str(run))
    assert spec.concat == "superres2x" and spec.input_channels == 2
    sample.FLAGS.unparse_flags()
    sample.FLAGS(["sample.py", f"--workdir={run}", "--num_samples=6", "--batch_size=8", "--steps=3",
                  f"--output={tmp_path / 's'}"])
    sample.run()
    got = np.load(tmp_path / "s" / "samples.npy")
    assert got.shape == (6, 8, 8, 1) and "the observations, the samples, the originals" in capsys.readouterr().out
    # The same samples from the library, given the held-out digits the CLI used.
    model = loading.load_model(str(run))
    want = ex.generate(model, 6, 8, 3, sources=load_digits("test")[0][:6], progress=False)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="give sources"):
        ex.generate(model, 2, 8, 3, progress=False)
    with pytest.raises(ValueError, match=r"sources must be uint8 images \[N, 8, 8, 1\]"):
        ex.generate(model, 2, 8, 3, sources=np.zeros((2, 4, 4, 1), np.uint8), progress=False)
    sample.FLAGS.unparse_flags()
    sample.FLAGS(["sample.py", f"--workdir={run}", "--mode=interpolation", f"--output={tmp_path / 'i'}"])
    with pytest.raises(ValueError, match="--mode=interpolation is not offered for a concat-conditioned model"):
        sample.run()
