"""Training the KL autoencoder with train.py's loop: the loss terms against independent computations
(diffusers' posterior KL, gradients of the whole loss), the PatchGAN's known geometry, the discriminator's
switch-on step, and a tiny run end to end (export, load, exact resume, clear refusals)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT, leaves, random_params

from ddim_jax import kinds, loading, training
from ddim_jax.config import autoencoder_config, spec_from_config, validate_config
from ddim_jax.data import load_digits, make_source
from ddim_jax.training import objectives
from ddim_jax.training.run import build


def ae_config(**training_overrides):
    c = autoencoder_config()
    c.data.image_size = 16
    # One level (f = 1) keeps the compiles short; the levels' layout is tested against diffusers elsewhere.
    c.model.update(block_out_channels=(8,), layers_per_block=1, latent_channels=2, norm_groups=4)
    c.loss.update(disc_start=2, disc_layers=1, disc_channels=8)
    c.training.update(batch_size=8, num_steps=4, warmup_steps=1, log_every=2, checkpoint_every=2, sample_every=4,
                      num_sample_images=4)
    c.training.update(training_overrides)
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ae") / "run"
    result = training.train(ae_config(), str(workdir), progress=False, devices=jax.devices()[:2])
    return workdir, result


def test_kl_matches_diffusers_posterior():
    torch = pytest.importorskip("torch")
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    rng = np.random.default_rng(0)
    mean, logvar = rng.normal(size=(3, 4, 4, 2)).astype(np.float32), rng.normal(size=(3, 4, 4, 2)).astype(np.float32)
    moments = torch.from_numpy(np.concatenate([mean, logvar], -1).transpose(0, 3, 1, 2))
    want = DiagonalGaussianDistribution(moments).kl().numpy()
    np.testing.assert_allclose(kinds.kl_to_standard_normal(mean, logvar), want, rtol=1e-5)


def test_patch_discriminator_has_pix2pix_geometry():
    # pix2pix's 70x70 PatchGAN (3 layers) maps a 256x256 image to 30x30 logits.
    d = objectives.PatchDiscriminator(layers=3, channels=64)
    out = jax.eval_shape(lambda k: d.init_with_output(k, jnp.zeros((1, 256, 256, 3)))[0], jax.random.key(0))
    assert out.shape == (1, 30, 30, 1)


def _loss_terms(config, params, x0, keys):
    """The autoencoder objective's pieces computed the long way: whole-tree gradients of each term."""
    spec = spec_from_config(config)
    net = spec.build()
    mean, logvar = net.apply({"params": params["autoencoder"]}, x0, method="encode")
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), mean.shape[1:]))(keys)
    disc = objectives.PatchDiscriminator(config.loss.disc_layers, config.loss.disc_channels)

    def rec_of(ae):
        return net.apply({"params": ae}, mean + jnp.exp(0.5 * logvar) * noise, method="decode")

    l1 = lambda ae: jnp.mean(jnp.abs(x0 - rec_of(ae)))  # noqa: E731
    adv = lambda ae: -jnp.mean(disc.apply({"params": params["discriminator"]}, rec_of(ae)))  # noqa: E731
    l1_value, g1 = jax.value_and_grad(l1)(params["autoencoder"])
    adv_value, g2 = jax.value_and_grad(adv)(params["autoencoder"])
    g1, g2 = (g["decoder"]["conv_out"]["kernel"] for g in (g1, g2))
    weight = config.loss.disc_weight * jnp.linalg.norm(g1) / (jnp.linalg.norm(g2) + 1e-4)
    kl = jnp.mean(0.5 * jnp.sum(mean ** 2 + jnp.exp(logvar) - 1 - logvar, axis=(1, 2, 3)))
    return l1_value, kl, adv_value, weight


def test_loss_terms_and_the_discriminator_switch():
    config = ae_config()
    config.loss.disc_start = 5
    obj = build(config).objective
    params = random_params(jax.eval_shape(obj.init, jax.random.key(0)))  # any weights: no init to compile
    x0 = np.random.default_rng(1).uniform(-1, 1, (4, 16, 16, 1)).astype(np.float32)
    keys = jax.random.split(jax.random.key(2), 4)
    # One device's loss, inside the mapped batch axes 'data' and 'fsdp' (the objective averages over them).
    value_and_grad = jax.jit(jax.vmap(jax.vmap(jax.value_and_grad(
        lambda p, step: obj.loss(p, {}, x0, None, keys, step, None), has_aux=True), (None, None), axis_name="fsdp",
        axis_size=1), (None, 0), axis_name="data"))
    l1, kl, adv, weight = map(np.asarray, jax.jit(lambda p: _loss_terms(config, p, x0, keys))(params))
    pixels = 16 * 16
    for step in (4, 5):  # the discriminator's terms switch on at disc_start = 5
        (_, m), grads = jax.tree.map(lambda a: np.asarray(a)[0, 0], value_and_grad(params, np.array([step], np.int32)))
        on = float(step >= 5)
        np.testing.assert_allclose(m["rec_loss"], l1, rtol=1e-5)
        np.testing.assert_allclose(m["kl"], kl, rtol=1e-4)
        np.testing.assert_allclose(m["d_weight"], weight, rtol=1e-3)
        np.testing.assert_allclose(m["loss"], l1 + 1e-6 * kl / pixels + on * weight * adv, rtol=1e-5)
        disc_grad = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads["discriminator"]))
        if on:
            assert disc_grad > 1e-6 and m["disc_loss"] > 0  # the discriminator learns from its hinge loss
        else:
            assert disc_grad == 0.0 and m["disc_loss"] == 0.0  # and not before disc_start


def test_a_run_trains_exports_and_resumes_exactly(run, tmp_path):
    workdir, result = run
    assert result.steps_run == 4
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and {"rec_loss", "kl", "disc_loss", "d_weight"} <= set(rows[0])
    assert rows[0]["disc_loss"] == 0.0 < rows[1]["disc_loss"]  # switched on at step 2
    spec, params = loading.load(str(workdir))
    assert spec.kind == "autoencoder_kl" and spec.schedule is None and spec.info["step"] == 4
    assert "discriminator" not in params and set(params) >= {"encoder", "decoder"}
    _, raw = loading.load(str(workdir), use_ema=False)  # a checkpoint's raw params: the autoencoder's alone too
    assert jax.tree.structure(raw) == jax.tree.structure(params)
    assert (workdir / "samples" / "step_00000004.png").is_file()  # originals over reconstructions
    # Interrupted at 2 and resumed, the run ends bitwise where the uninterrupted one did.
    part = tmp_path / "split"
    training.train(ae_config(num_steps=2), str(part), progress=False, devices=jax.devices()[:2])
    rest = training.train(ae_config(), str(part), progress=False, devices=jax.devices()[:2])
    assert rest.steps_run == 2
    for a, b in zip(leaves(result.state), leaves(rest.state)):
        np.testing.assert_array_equal(a, b)


def test_the_autoencoder_reconstructs_after_training(run):
    workdir, _ = run
    spec, params = loading.load(str(workdir))
    x = make_source(ae_config().data).get(np.arange(8)).astype(np.float32) / 127.5 - 1
    rec = jax.jit(lambda p, x: spec.build().apply({"params": p}, x))(params, x)
    assert rec.shape == x.shape and np.all(np.isfinite(rec))


def test_diffusion_tools_refuse_an_autoencoder(run):
    workdir, _ = run
    spec, params = loading.load(str(workdir))
    with pytest.raises(ValueError, match="autoencoder_kl model, not a diffusion model"):
        spec.eps_fn(params)
    out = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--workdir={workdir}", "--mode=sample",
                          f"--output={workdir.parent / 'out'}"], text=True, capture_output=True, timeout=120,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "not a diffusion model" in out.stderr.strip().splitlines()[-1]


def test_digits_upscale_to_the_configured_size():
    src = make_source(ae_config().data)
    small, _ = load_digits()
    assert src.get(np.arange(3)).shape == (3, 16, 16, 1)
    # Bicubic upscaling keeps the digit: box-downsampling it back lands near the 8x8 original.
    back = src.get(np.arange(50)).astype(np.float32).reshape(50, 8, 2, 8, 2, 1).mean(axis=(2, 4))
    assert np.abs(back - small[:50]).mean() < 20  # of 255


@pytest.mark.parametrize("field,value,match", [
    ("loss.kl_weight", -1.0, "loss.kl_weight must be a finite number >= 0"),
    ("loss.disc_layers", 4, r"loss.disc_layers must be a positive integer with 2\^\(layers \+ 1\) <= data.image_size"),
    ("loss.disc_channels", 12, "loss.disc_channels must be a positive multiple of 8"),
    ("loss.klweight", 1.0, "unknown config field loss.klweight; the loss block has codebook_weight, disc_channels"),
    ("model.ch", 32, "unknown config field model.ch; the model block has block_out_channels"),
    ("model.norm_groups", 3, r"model.norm_groups must be a positive integer dividing every level's channels \(8\)"),
    ("model.block_out_channels", (8, 8, 8, 8, 8, 8), "data.image_size must be a multiple of 32"),
    ("training.remat", True, "training.remat must be False"),
])
def test_bad_autoencoder_configs(field, value, match):
    c = ae_config()
    block, name = field.split(".")
    c[block][name] = value
    with pytest.raises(ValueError, match=match):
        validate_config(c)


def test_a_diffusion_workdir_refuses_an_autoencoder_config(tmp_path):
    from helpers import tiny_config

    from ddim_jax import files
    from ddim_jax.config import to_dict

    files.write_json(str(tmp_path / "config.json"), to_dict(tiny_config()))  # a diffusion run, stopped early
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(ValueError, match="holds a run with a different config"):
        training.train(ae_config(), str(tmp_path), progress=False, devices=jax.devices()[:1])
    assert (tmp_path / "config.json").read_text() == before and not (tmp_path / "model").exists()


def test_a_vq_autoencoder_trains_and_uses_its_codebook(tmp_path):
    c = autoencoder_config("autoencoder_vq")
    c.data.image_size = 16
    c.model.update(block_out_channels=(8,), layers_per_block=1, latent_channels=2, num_embeddings=16, norm_groups=4)
    c.loss.update(disc_weight=0.0)
    c.training.update(batch_size=8, num_steps=6, warmup_steps=1, log_every=3, checkpoint_every=6, sample_every=0,
                      lr=1e-2)
    for field, bad, match in (("num_embeddings", 1, "model.num_embeddings must be an integer >= 2"),
                              ("beta", float("inf"), "model.beta must be a finite number >= 0")):
        wrong = autoencoder_config("autoencoder_vq")
        wrong.model[field] = bad
        with pytest.raises(ValueError, match=match):
            validate_config(wrong)
    training.train(c, str(tmp_path), progress=False, devices=jax.devices()[:1])
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["rec_loss"] < rows[0]["rec_loss"] and 1 <= rows[-1]["codes_used"] <= 16
    assert {"vq_loss", "codes_used"} <= set(rows[0]) and "kl" not in rows[0]
    spec, params = loading.load(str(tmp_path))
    assert spec.kind == "autoencoder_vq" and params["quantize"]["embedding"]["embedding"].shape == (16, 2)
