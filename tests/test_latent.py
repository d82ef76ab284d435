"""Latent diffusion: the latent model spec and its format, the encoding against the autoencoder called
directly, the class-conditional cross-attention UNet against UNet2DCondition on its class tokens, and a
tiny latent run end to end (scale factor, the run's copy of its autoencoder, exact resume when the named
autoencoder changes, export, sampling and reconstruction, refusals)."""

import dataclasses
import functools
import json
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import leaves, random_params

from ddim_jax import experiments as ex
from ddim_jax import loading, models, training
from ddim_jax.cond_unet import ClassConditionedUNet, UNet2DCondition
from ddim_jax.config import base_config
from ddim_jax.data import load_digits
from ddim_jax.training import latent
from ddim_jax.training import run as run_lib
from ddim_jax.training.run import build, resolve

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sample  # noqa: E402

AE = models.ModelSpec("autoencoder_kl", dict(block_out_channels=(8, 8), layers_per_block=1, latent_channels=2,
                                             norm_groups=4), 8, 1, None, None)
UNET = dict(block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=2,
            cross_attention_dim=8, context_tokens=2, norm_groups=4)
# The tiny run's denoiser: one level without attention, the labels reaching it through the mid block's
# cross-attention (the two-level UNET above, with cross-attention levels, is tested against UNet2DCondition
# and in the spec tests; this keeps the run's compiled programs small: its train step compiles in half the time).
RUN_UNET = dict(UNET, block_out_channels=(8,), down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",))
SCHEDULE = {"name": "cosine", "num_timesteps": 1000}


@functools.cache
def ae_params(seed=0):
    """The autoencoder's weights for these tests (random: what is tested is how a latent model uses its
    autoencoder, whatever its weights), read-only so that no test can change another's."""
    params = random_params(AE.param_shapes(), seed)
    for a in jax.tree.leaves(params):
        a.setflags(write=False)
    return params


@functools.partial(jax.jit, static_argnames="method")
def ae_apply(params, x, method=None):
    """The autoencoder called directly (the reference for the latent model's encoding and decoding), compiled:
    one program per method and shape instead of an eager dispatch per operation."""
    return AE.build().apply({"params": params}, x, method=method)


def latent_spec(scale=0.5):
    return models.ModelSpec("cross_attention_unet", UNET, 4, 2, SCHEDULE, "epsilon", 10, 10, autoencoder=AE,
                            scale_factor=scale)


def config(ae_path, **training):
    c = base_config("cross_attention_unet")
    c.model.update(RUN_UNET)
    c.latent.autoencoder = str(ae_path)
    c.training.update(batch_size=8, num_steps=4, warmup_steps=1, log_every=2, checkpoint_every=2, sample_every=0)
    c.training.update(training)
    return c


# -- the spec and the format


def test_latent_spec_round_trips_and_holds_both_networks(tmp_path):
    spec = latent_spec()
    assert spec.sample_shape == (4, 4, 2) and spec.output_shape == (8, 8, 1)
    assert set(spec.param_shapes()) == {"denoiser", "autoencoder"}
    d = json.loads(json.dumps(spec.to_dict()))
    assert "info" not in d["autoencoder"] and models.ModelSpec.from_dict(d) == spec
    params = {"denoiser": random_params(spec.param_shapes()["denoiser"], 1), "autoencoder": ae_params()}
    models.save(tmp_path / "m", spec, params)
    spec2, params2 = loading.load(tmp_path / "m")
    assert spec2 == spec and spec2.scale_factor == 0.5
    for a, b in zip(leaves(params), leaves(params2)):
        np.testing.assert_array_equal(a, b)
    # A pixel-space spec keeps the spec.json it always had (no latent fields).
    pixel = models.ModelSpec("unet", {"ch": 8, "ch_mult": (1,), "num_res_blocks": 1, "norm_groups": 4}, 8, 1, SCHEDULE)
    assert "autoencoder" not in pixel.to_dict() and "scale_factor" not in pixel.to_dict()
    unscaled = dataclasses.replace(spec, scale_factor=None)  # a config's spec before its run estimated the scale
    with pytest.raises(ValueError, match="scale_factor has not been estimated"):
        unscaled.decode(params, jnp.zeros((1, 4, 4, 2)))
    with pytest.raises(ValueError, match="scale_factor has not been estimated"):
        models.save(tmp_path / "n", unscaled, params)
    assert not (tmp_path / "n").exists()


@pytest.mark.parametrize("change, message", [
    (dict(image_size=8), r"image_size and channels are its autoencoder's latents' \(4, 2\); got \(8, 2\)"),
    (dict(channels=3), r"latents' \(4, 2\); got \(4, 3\)"),
    (dict(scale_factor=0.0), "scale_factor must be a finite number > 0"),
    (dict(scale_factor=float("nan")), "scale_factor must be a finite number > 0"),
    (dict(autoencoder=None), "scale_factor applies to latent diffusion models"),
    (dict(autoencoder=models.ModelSpec("unet", {"ch": 8, "ch_mult": (1,), "num_res_blocks": 1, "norm_groups": 4},
                                       8, 1, SCHEDULE)), "must be the spec of an autoencoder model; got 'unet'"),
])
def test_latent_spec_refuses_inconsistent_fields(change, message):
    d = dict(kind="cross_attention_unet", arch=UNET, image_size=4, channels=2, schedule=SCHEDULE,
             prediction_type="epsilon", num_classes=10, null_label=10, autoencoder=AE, scale_factor=0.5)
    d.update(change)
    with pytest.raises(ValueError, match=message):
        models.ModelSpec(**d)


def test_encode_and_decode_are_the_autoencoder_with_the_scale():
    spec, params = latent_spec(0.25), {"autoencoder": ae_params()}
    net = AE.build()
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (3, 8, 8, 1)).astype(np.float32)
    noise, z = rng.standard_normal((2, 3, 4, 4, 2)).astype(np.float32)

    @jax.jit  # the spec's calls and the autoencoder's own, in one program
    def both(params, x, noise, z):
        ae = {"params": params["autoencoder"]}
        return (spec.encode(params, x), spec.encode(params, x, noise), spec.decode(params, z),
                net.apply(ae, x, method="encode"), net.apply(ae, z / 0.25, method="decode"))

    enc, enc_noise, dec, (mean, logvar), want_dec = both(params, x, noise, z)
    np.testing.assert_allclose(enc, 0.25 * mean, rtol=1e-6)
    np.testing.assert_allclose(enc_noise, 0.25 * (mean + np.exp(0.5 * logvar) * noise), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dec, want_dec, rtol=1e-5, atol=1e-6)


def test_class_conditioned_unet_is_unet2dcondition_on_its_class_tokens():
    m = ClassConditionedUNet(num_labels=11, in_channels=2, out_channels=2, **UNET)
    x, t, y = jax.random.normal(jax.random.key(0), (3, 4, 4, 2)), jnp.array([0, 500, 999]), jnp.array([0, 4, 10])
    params = random_params(jax.eval_shape(m.init, jax.random.key(1), x, t, y)["params"], 1)
    tokens = params["class_tokens"]["embedding"][y].reshape(3, 2, 8)  # tau_theta(y): two 8-value tokens per label
    unet = UNet2DCondition(UNET["block_out_channels"], UNET["down_block_types"], UNET["up_block_types"], 1, 2, 1, 8,
                           2, 2, 4, use_linear_projection=True)
    want = jax.jit(unet.apply)({"params": params["unet"]}, x, t, tokens)
    apply = jax.jit(m.apply)
    np.testing.assert_allclose(apply({"params": params}, x, t, y), want, rtol=1e-5, atol=1e-6)
    other = apply({"params": params}, x, t, jnp.array([1, 5, 9]))
    assert np.abs(np.asarray(other) - np.asarray(want)).max() > 1e-4  # the label reaches the output


# -- a tiny latent run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent")
    models.save(root / "ae", AE, ae_params(0))
    workdir = root / "run"
    result = training.train(config(root / "ae"), str(workdir), progress=False, devices=jax.devices()[:2])
    return root, workdir, result


def test_the_scale_factor_whitens_the_training_latents(run):
    root, workdir, _ = run
    copy_spec, copy_params = loading.load(workdir / latent.COPY_DIR)
    scale = copy_spec.info["scale_factor"]
    assert json.loads((workdir / run_lib.RECORD_FILE).read_text())["scale_factor"] == scale
    # Independently: posterior samples (other noise) of the first 1024 training digits, through the autoencoder.
    x = load_digits("train")[0][:latent.SCALE_IMAGES].astype(np.float32) / 127.5 - 1.0
    mean, logvar = map(np.asarray, ae_apply(ae_params(0), x, method="encode"))
    z = mean + np.exp(0.5 * logvar) * np.random.default_rng(7).standard_normal(mean.shape)
    assert abs(scale * float(np.std(np.asarray(z))) - 1.0) < 0.02


def test_export_holds_the_denoiser_and_the_frozen_autoencoder(run):
    root, workdir, result = run
    spec, params = loading.load(workdir)
    copy_spec = loading.load(workdir / latent.COPY_DIR)[0]
    assert spec.autoencoder == AE and spec.scale_factor == copy_spec.info["scale_factor"]
    for a, b in zip(leaves(params["autoencoder"]), leaves(ae_params(0))):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(leaves(params["denoiser"]), leaves(result.state.ema_params)):
        np.testing.assert_array_equal(a, b)
    spec2, params2 = loading.load(workdir, step=2)  # a checkpoint: the denoiser, with the run's autoencoder copy
    assert spec2.scale_factor == spec.scale_factor and set(params2) == {"denoiser", "autoencoder"}


def test_latent_loss_is_the_pixel_loss_on_the_encoded_latents(run):
    root, workdir, _ = run
    cfg = config(root / "ae")
    lat_run = resolve(cfg, str(workdir))
    first, lat = lat_run.first_stage, lat_run.objective
    pixel_cfg = base_config("cross_attention_unet")
    pixel_cfg.model.update(RUN_UNET)
    pixel_cfg.data.update(image_size=4, channels=2)
    pix = build(pixel_cfg).objective
    params = loading.load(workdir)[1]["denoiser"]  # the run's denoiser: any weights would do
    x = load_digits("train")[0][:4].astype(np.float32) / 127.5 - 1.0
    labels = np.array([1, 2, 3, 4])

    def keys():  # each example's key (traced inside the compiled calls below: no eager dispatches)
        return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(5), i))(jnp.arange(4))

    @jax.jit
    def want(p, ae, x):
        # The run's latents, computed here with the autoencoder: a posterior sample (key fold 4) times the scale.
        mean, logvar = AE.build().apply({"params": ae}, x, method="encode")
        noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 4), (4, 4, 2)))(keys())
        z = lat_run.record.scale_factor * (mean + jnp.exp(0.5 * logvar) * noise)
        return pix.loss(p, {}, z, labels, keys(), 0, jax.random.key(0))[0]

    got = jax.jit(lambda p, f, x: lat.loss(p, f, x, labels, keys(), 0, jax.random.key(0))[0])(params, lat_run.frozen, x)
    np.testing.assert_allclose(got, want(params, first.params, x), rtol=1e-5)


def test_resume_uses_the_runs_copy_when_the_named_autoencoder_changes(run, tmp_path):
    root, workdir, result = run
    # The module run's autoencoder path (so its config, and the compiled train step, are the module run's),
    # retrained in place below and put back afterwards.
    src = root / "ae"
    other = tmp_path / "run"
    training.train(config(src, num_steps=2), str(other), progress=False, devices=jax.devices()[:2])
    models.save(src, AE, ae_params(1), overwrite=True)  # the autoencoder was retrained in place
    try:
        resumed = training.train(config(src), str(other), progress=False, devices=jax.devices()[:2])
        for a, b in zip(leaves(resumed.state.params), leaves(result.state.params)):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(leaves(loading.load(other)[1]["autoencoder"]), leaves(ae_params(0))):
            np.testing.assert_array_equal(a, b)
        # The config is what was asked for; what the run found is its record.
        saved = json.loads((other / "config.json").read_text())["latent"]
        assert saved == {"autoencoder": str(src), "scale_factor": 0.0}
        record = json.loads((other / run_lib.RECORD_FILE).read_text())
        assert record["autoencoder_sha256"] == models.params_digest(ae_params(0)) != models.params_digest(ae_params(1))
        assert record["scale_factor"] > 0 and models.ModelSpec.from_dict(record["autoencoder"]) == AE
        # Without its copy, the run would resume with whatever the named path holds now: refused.
        shutil.rmtree(other / latent.COPY_DIR)
        with pytest.raises(ValueError, match=r"different config \(record.autoencoder_sha256"):
            training.train(config(src, num_steps=4), str(other), progress=False, devices=jax.devices()[:2])
    finally:
        models.save(src, AE, ae_params(0), overwrite=True)


def test_experiments_decode_to_images(run):
    root, workdir, _ = run
    model = loading.load_model(str(workdir), devices=jax.devices()[:2])
    assert model.clip_x0 is None and model.sample_shape == (4, 4, 2)
    imgs = ex.generate(model, 4, 4, 3, labels="all", guidance=2.0, progress=False)
    assert imgs.shape == (4, 8, 8, 1) and imgs.dtype == np.uint8
    assert ex.sequence(model, 4, 3).shape == (4, 4, 8, 8, 1)  # the latents and final decode of generate's batch


def test_sample_cli_reconstruction_names_the_autoencoder_row(run, tmp_path, capsys):
    # sample.py's reconstruction mode is experiments.reconstruction, with its row for the autoencoder alone.
    root, workdir, _ = run
    sample.FLAGS.unparse_flags()
    sample.FLAGS(["sample.py", f"--workdir={workdir}", "--mode=reconstruction", "--num_samples=8", "--steps_list=2",
                  "--batch_size=8", f"--output={tmp_path / 'rec'}"])
    sample.run()
    errors = json.loads((tmp_path / "rec" / "reconstruction.json").read_text())["mse_per_dim_0_1"]
    assert set(errors) == {"2", "autoencoder"}
    assert "| S | 2 | autoencoder |" in capsys.readouterr().out
    # The autoencoder alone: image -> posterior mean -> image, computed here on the first 8 test digits.
    spec, params = loading.load(str(workdir))
    x = load_digits("test")[0][:8].astype(np.float32) / 127.5 - 1.0
    rec = ae_apply(params["autoencoder"], x)
    want = float(np.mean((np.clip(np.asarray(rec), -1, 1) / 2 - x / 2) ** 2))
    assert errors["autoencoder"] == pytest.approx(want, rel=1e-4)


def test_sample_modes_read_the_digits_as_training_saw_them():
    # reconstruction and fid read the training data at the run's data.image_size (the latent digits
    # model's autoencoder encodes the digits upscaled to 32x32), not at the digits' own 8x8.
    class Model:
        data = {"dataset": "digits", "image_size": 32, "channels": 1}

    sample.FLAGS.unparse_flags()
    sample.FLAGS(["sample.py"])
    images = sample._dataset_images(Model(), "test", 5)
    assert images.shape == (5, 32, 32, 1) and images.dtype == np.uint8
    small = load_digits("test")[0][:5].astype(np.float32)
    big = np.repeat(np.repeat(small, 4, axis=1), 4, axis=2)
    assert np.corrcoef(images.ravel().astype(np.float32), big.ravel())[0, 1] > 0.9  # the same test digits


def test_latent_configs_refuse_a_bad_autoencoder(run, tmp_path):
    root, workdir, _ = run
    cases = [(tmp_path / "missing", FileNotFoundError, "latent.autoencoder: .* does not exist"),
             (workdir, ValueError, "holds a cross_attention_unet diffusion model, not an autoencoder")]
    bigger = tmp_path / "ae16"
    models.save(bigger, dataclasses.replace(AE, image_size=16), ae_params(0))
    cases.append((bigger, ValueError, r"encodes 16x16x1 images; data.image_size and data.channels give 8x8x1"))
    for path, error, message in cases:
        target = tmp_path / f"run_{path.name}"
        with pytest.raises(error, match=message):
            training.train(config(path), str(target), progress=False, devices=jax.devices()[:1])
        assert not (target / "config.json").exists() and not (target / latent.COPY_DIR).exists()
