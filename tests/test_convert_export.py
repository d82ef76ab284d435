"""Model directories back to diffusers (``python -m ddim_jax.convert --to diffusers``) and the converters' table,
checked against diffusers' and transformers' own torch classes: our random models exported and loaded there give
our outputs; a diffusers Stable Diffusion folder converted and exported again has the same weights bit for bit
and the same images in StableDiffusionPipeline; what has no counterpart, and bad destinations, are refused."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import flax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ddim_jax import kinds, models
from ddim_jax.convert import CONVERTERS, NO_EXTERNAL_FORMAT, ConversionError, converter, diffusers_schedule, main
from ddim_jax.convert import scheduler_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from test_clip_text import _vocab_folder  # noqa: E402  (a tiny CLIP BPE vocabulary as a tokenizer/ folder)

SIDE, LAT, D = 16, 8, 16  # image side, latent side, text width
UNET = dict(block_out_channels=(16,), down_block_types=("CrossAttnDownBlock2D",),
            up_block_types=("CrossAttnUpBlock2D",), layers_per_block=1, attention_head_dim=2, cross_attention_dim=D)
VAE = dict(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4)
SCHEDULE = {"name": "scaled_linear", "num_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012}
SMALL = dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), norm_groups=8)  # a pixel UNet to refuse


def _rel(a, b):
    """The largest difference relative to the reference's largest magnitude."""
    b = np.asarray(b, np.float64)
    assert np.abs(b).max() > 1e-3
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def _random_params(spec, seed):
    """Random params of the spec's shapes (no init to compile): kernels and biases N(0, 0.1^2), norm scales
    1 + N(0, 0.1^2); every value differs, so a transposed or swapped key shows."""
    rng = np.random.default_rng(seed)
    return flax.traverse_util.unflatten_dict({
        path: jnp.asarray((path[-1] == "scale") + 0.1 * rng.standard_normal(s.shape), jnp.float32)
        for path, s in flax.traverse_util.flatten_dict(spec.param_shapes()).items()})


def _torch_perturb(*modules):
    torch.manual_seed(0)
    with torch.no_grad():
        for mod in modules:
            for p in mod.parameters():
                p.add_(0.05 * torch.randn_like(p))


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _export(model_dir, out, *flags):
    return main(["--to", "diffusers", str(model_dir), str(out), *flags])


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


# ----------------------------------------------------------------------------------------------
# The table


def test_every_registered_kind_has_a_converter_or_a_reason_it_has_none():
    assert not set(CONVERTERS) & set(NO_EXTERNAL_FORMAT)
    assert set(kinds.KINDS) == set(CONVERTERS) | set(NO_EXTERNAL_FORMAT)
    for kind, entry in CONVERTERS.items():
        library = {"diffusers": diffusers, "transformers": transformers}[entry.library]
        assert hasattr(library, entry.class_name), (kind, entry.class_name)
    with pytest.raises(ConversionError, match="cross_attention_unet model has no diffusers .*class embedder"):
        converter("cross_attention_unet")
    with pytest.raises(ValueError, match="model kind must be one of"):
        converter("nope")


@pytest.mark.parametrize("schedule,prediction", [
    ({"name": "linear", "num_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02}, "epsilon"),
    (SCHEDULE, "v"), ({"name": "cosine", "num_timesteps": 500}, "x0"),
    ({"name": "sigmoid", "num_timesteps": 200}, "epsilon"),
    ({"name": "custom", "betas": list(np.linspace(1e-3, 0.3, 50))}, "v"),
    ({"name": "scaled_linear", "num_timesteps": 1000, "rescale_zero_terminal_snr": True}, "v"),
])
def test_scheduler_config_gives_diffusers_our_schedule(schedule, prediction):
    spec = models.ModelSpec("unet", {}, 8, 3, schedule, prediction)
    config = scheduler_config(spec)
    sched = diffusers.DDIMScheduler.from_config(config)
    ours = spec.make_schedule()
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), np.cumprod(1 - ours.betas.astype(np.float64)),
                               rtol=2e-5, atol=1e-7)
    assert sched.config.prediction_type == {"x0": "sample", "v": "v_prediction"}.get(prediction, prediction)
    back, pred = diffusers_schedule(json.loads(json.dumps(config)))  # our reader gives the schedule back
    assert pred == prediction
    if schedule["name"] != "sigmoid" and "rescale_zero_terminal_snr" not in schedule:
        assert models.ModelSpec("unet", {}, 8, 3, back, pred).schedule == spec.schedule
    else:  # DDIMScheduler has no sigmoid betas: they travel as trained_betas, and come back as a custom schedule
        assert back.get("rescale_zero_terminal_snr", False) == schedule.get("rescale_zero_terminal_snr", False)


# ----------------------------------------------------------------------------------------------
# (a) our random models -> diffusers / transformers: the same outputs


def test_a_pixel_unet_exports_to_a_ddim_pipeline_with_our_outputs(tmp_path):
    spec = models.ModelSpec("unet", dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                                         norm_groups=8), SIDE, 3, {"name": "cosine", "num_timesteps": 1000}, "v",
                            num_classes=3, null_label=3)
    params = _random_params(spec, 1)
    models.save(str(tmp_path / "model"), spec, params)
    assert _export(tmp_path / "model", tmp_path / "out") == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["model_index.json", "scheduler", "unet"]
    pipe = diffusers.DDIMPipeline.from_pretrained(tmp_path / "out", local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    x = np.random.default_rng(0).standard_normal((3, SIDE, SIDE, 3)).astype(np.float32)
    t, y = np.array([0, 500, 999]), np.array([0, 2, 3])  # 3: the null label
    with torch.no_grad():
        want = _nhwc(pipe.unet(_nchw(x), torch.from_numpy(t), class_labels=torch.from_numpy(y)).sample)
    ours = jax.jit(spec.build().apply)({"params": params}, x, t, y)
    assert _rel(ours, want) < 1e-4


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """A random latent text-to-image model of ours (UNet, VAE, CLIP text encoder and tokenizer), exported."""
    root = tmp_path_factory.mktemp("ours")
    tok, vocab = _vocab_folder(root / "vocab")
    text = models.ModelSpec("clip_text", dict(vocab_size=vocab, hidden_size=D, intermediate_size=32,
                                              num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                              hidden_act="gelu", eos_token_id=tok.eos_id), None, None, None, None)
    ae = models.ModelSpec("autoencoder_kl", dict(VAE, norm_groups=8), SIDE, 3, None, None)
    spec = models.ModelSpec("unet2d_condition", dict(UNET, norm_groups=8), LAT, 4, SCHEDULE, "epsilon",
                            autoencoder=ae, scale_factor=0.3, text_encoder=text)
    params = _random_params(spec, 2)
    models.save(str(root / "model"), spec, params, tokenizer=tok)
    assert _export(root / "model", root / "out") == 0
    return root, spec, params, tok


def test_a_latent_model_exports_to_stable_diffusion_with_our_outputs(ours):
    root, spec, params, tok = ours
    out = root / "out"
    assert sorted(os.listdir(out)) == ["model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert isinstance(pipe.text_encoder, transformers.CLIPTextModel) and pipe.vae.config.scaling_factor == 0.3
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, LAT, LAT, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 5, D)).astype(np.float32)
    t = np.array([3, 900])
    images = rng.uniform(-1, 1, (2, SIDE, SIDE, 3)).astype(np.float32)
    ids = tok(["a cat", "cat at a cat"])
    with torch.no_grad():
        eps = _nhwc(pipe.unet(_nchw(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx)).sample)
        mean = _nhwc(pipe.vae.encode(_nchw(images)).latent_dist.mean)
        decoded = _nhwc(pipe.vae.decode(_nchw(x)).sample)
        hidden = pipe.text_encoder(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
        pipe_ids = pipe.tokenizer(["a cat", "cat at a cat"], padding="max_length", max_length=77).input_ids
    unet, vae, text = spec.build(), spec.autoencoder.build(), spec.text_encoder.build()

    @jax.jit
    def outputs(params, x, t, ctx, images, ids):  # one program
        return (unet.apply({"params": params["denoiser"]}, x, t, ctx),
                vae.apply({"params": params["autoencoder"]}, images, method="encode")[0],
                vae.apply({"params": params["autoencoder"]}, x, method="decode"),
                text.apply({"params": params["text_encoder"]}, ids, 0, method="encode"))

    for got, want in zip(outputs(params, x, t, ctx, images, ids), (eps, mean, decoded, hidden)):
        assert _rel(got, want) < 1e-4
    np.testing.assert_array_equal(np.asarray(pipe_ids), ids)  # transformers reads the exported tokenizer/ as ours
    # ... and the importer reads the folder back as this model, bit for bit.
    assert main([str(out), str(root / "back")]) == 0
    back, back_params = models.load(root / "back")
    for a, b in ((back, spec), (back.autoencoder, spec.autoencoder), (back.text_encoder, spec.text_encoder)):
        assert kinds.get(a.kind).full_arch(a.arch) == kinds.get(b.kind).full_arch(b.arch)
    assert (back.schedule, back.prediction_type, back.scale_factor) == (spec.schedule, "epsilon", 0.3)
    jax.tree.map(np.testing.assert_array_equal, back_params, params)
    np.testing.assert_array_equal(models.load_tokenizer(root / "back")(["a cat"]), tok(["a cat"]))


def test_a_vq_autoencoder_exports_to_a_vqmodel_with_our_outputs(tmp_path):
    spec = models.ModelSpec("autoencoder_vq", dict(VAE, norm_groups=8, num_embeddings=16, embedding_dim=3),
                            SIDE, 3, None, None)
    params = _random_params(spec, 3)
    models.save(str(tmp_path / "model"), spec, params)
    assert _export(tmp_path / "model", tmp_path / "out") == 0
    vq = diffusers.VQModel.from_pretrained(tmp_path / "out", local_files_only=True)
    images = np.random.default_rng(0).uniform(-1, 1, (2, SIDE, SIDE, 3)).astype(np.float32)
    net = spec.build()
    z, decoded = jax.jit(lambda p, x: (net.apply({"params": p}, x, method="encode"),
                                       net.apply({"params": p}, x, method=lambda m, x: m.decode(m.encode(x)))))(
        params, images)
    with torch.no_grad():  # decoding quantises: both decode our latents (a code boundary is not crossed by round-off)
        assert _rel(z, _nhwc(vq.encode(_nchw(images)).latents)) < 1e-4
        assert _rel(decoded, _nhwc(vq.decode(_nchw(z)).sample)) < 1e-4
    entry = converter("autoencoder_vq")  # the table's reader and importer take the folder back
    back = entry.read_config(json.loads((tmp_path / "out" / "config.json").read_text()), "config.json")
    assert (back.image_size, back.channels) == (SIDE, 3)
    assert kinds.get(back.kind).full_arch(back.arch) == kinds.get(spec.kind).full_arch(spec.arch)
    jax.tree.map(np.testing.assert_array_equal, entry.to_params(load_file(tmp_path / "out" / entry.weights), back),
                 params)


# ----------------------------------------------------------------------------------------------
# (b), (c) a diffusers folder -> ours -> diffusers: the same weights, the same images


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A tiny random Stable Diffusion folder saved by diffusers and transformers, converted to a model directory
    and exported back."""
    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(in_channels=4, out_channels=4, norm_num_groups=8, sample_size=LAT, **UNET)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, norm_num_groups=8, sample_size=SIDE,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=0.3, **VAE)
    tok, vocab = _vocab_folder(root / "vocab")
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=vocab, hidden_size=D, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id))
    _torch_perturb(unet, vae, text)
    # The scheduler as the exporter writes one (ddim_jax's DDIM: no offset, the last step onto alpha-bar 1).
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, set_alpha_to_one=True, steps_offset=0)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(root / "sd", safe_serialization=True)
    tok.save(str(root / "sd" / "tokenizer"))
    index = json.loads((root / "sd" / "model_index.json").read_text())
    (root / "sd" / "model_index.json").write_text(json.dumps({**index, "tokenizer": ["transformers", "CLIPTokenizer"]}))
    assert main([str(root / "sd"), str(root / "model")]) == 0
    assert _export(root / "model", root / "out") == 0
    return root


@pytest.mark.parametrize("part,weights", [("unet", "diffusion_pytorch_model.safetensors"),
                                          ("vae", "diffusion_pytorch_model.safetensors"),
                                          ("text_encoder", "model.safetensors")])
def test_a_diffusers_folder_comes_back_with_the_same_weights_bit_for_bit(sd, part, weights):
    original, exported = load_file(sd / "sd" / part / weights), load_file(sd / "out" / part / weights)
    if part == "text_encoder":  # transformers 5 saves without text_model.; the export writes transformers 4's keys
        original = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in original.items()
                    if not k.endswith("position_ids")}
    assert sorted(original) == sorted(exported)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key
    cls = {"unet": diffusers.UNet2DConditionModel, "vae": diffusers.AutoencoderKL,
           "text_encoder": transformers.CLIPTextModel}[part]
    a = cls.from_pretrained(sd / "sd" / part, local_files_only=True).state_dict()
    b = cls.from_pretrained(sd / "out" / part, local_files_only=True).state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    for key in ("scaling_factor", "block_out_channels", "cross_attention_dim", "attention_head_dim", "hidden_act",
                "eos_token_id", "bos_token_id", "pad_token_id", "vocab_size", "sample_size"):
        configs = [json.loads((sd / d / part / "config.json").read_text()) for d in ("sd", "out")]
        if key in configs[0]:
            assert configs[1][key] == configs[0][key], key


def test_a_stable_diffusion_round_trip_gives_the_same_images(sd):
    pipes = [diffusers.StableDiffusionPipeline.from_pretrained(sd / d, local_files_only=True) for d in ("sd", "out")]
    latents = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 4, LAT, LAT)).astype(np.float32))
    images = [p(prompt="a cat", negative_prompt="cat at", latents=latents.clone(), num_inference_steps=3,
                guidance_scale=7.5, height=SIDE, width=SIDE, output_type="np").images for p in pipes]
    assert np.abs(images[0] - images[0].mean()).mean() > 1e-3  # not a flat image
    np.testing.assert_array_equal(images[1], images[0])
    with torch.no_grad():  # the prompts' embeddings: the tokenizer and the text encoder come back the same
        embeds = [p.encode_prompt("cat at a cat", "cpu", 1, False)[0] for p in pipes]
    assert torch.equal(embeds[0], embeds[1])


def test_a_pixel_diffusers_folder_comes_back_the_same(tmp_path):
    """UNet2DModel (its 1x1 convolution shortcuts are dense kernels here) with a DDIM scheduler."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=SIDE, block_out_channels=(16, 32), layers_per_block=1,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
                                 downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
                                 norm_num_groups=8, num_class_embeds=4)
    _torch_perturb(unet)
    diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(**{
        k: v for k, v in scheduler_config(models.ModelSpec("unet", {}, 8, 3, SCHEDULE, "v")).items()
        if not k.startswith("_")})).save_pretrained(tmp_path / "src")
    assert main([str(tmp_path / "src"), str(tmp_path / "model")]) == 0
    assert _export(tmp_path / "model", tmp_path / "out") == 0
    for f in ("unet/diffusion_pytorch_model.safetensors",):
        a, b = load_file(tmp_path / "src" / f), load_file(tmp_path / "out" / f)
        assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    a, b = (json.loads((tmp_path / d / "scheduler" / "scheduler_config.json").read_text()) for d in ("src", "out"))
    assert {k: a[k] for k in b if k[0] != "_"} == {k: v for k, v in b.items() if k[0] != "_"}
    spec, _ = models.load(tmp_path / "model")
    assert spec.prediction_type == "v" and spec.schedule == models.ModelSpec("unet", {}, 8, 3, SCHEDULE).schedule


# ----------------------------------------------------------------------------------------------
# Refusals


def _saved(path, spec, nan=False):
    """A model directory of ``spec``; its weights file is empty (the spec is refused before it is read), or with
    ``nan`` holds a NaN (models.save refuses one: written as a corrupted copy would hold it)."""
    path.mkdir()
    (path / models.SPEC_FILE).write_text(json.dumps({"format": models.FORMAT, "version": models.FORMAT_VERSION,
                                                     "spec": spec.to_dict()}))
    (path / models.PARAMS_FILE).write_bytes(b"")
    if nan:
        flat = {"/".join(k): np.full(s.shape, np.nan if i == 0 else 0.01, np.float32) for i, (k, s) in
                enumerate(sorted(flax.traverse_util.flatten_dict(spec.param_shapes()).items()))}
        save_file(flat, path / models.PARAMS_FILE)
    return path


@pytest.mark.parametrize("make,message", [
    (lambda: models.ModelSpec("cross_attention_unet", {}, 8, 4, SCHEDULE, num_classes=2),
     "cross_attention_unet model has no diffusers or transformers counterpart"),
    (lambda: models.ModelSpec("unet", dict(SMALL, resamp_with_conv=False), 8, 3, SCHEDULE), "resamp_with_conv=False"),
    (lambda: models.ModelSpec("unet", SMALL, 8, 3, SCHEDULE, concat="superres2x"), "unet concat='superres2x'"),
    (lambda: models.ModelSpec("unet", SMALL, 2, 4, SCHEDULE, autoencoder=models.ModelSpec(
        "autoencoder_kl", dict(VAE, norm_groups=8), 4, 3, None, None), scale_factor=1.0), "latent unet model"),
    (lambda: models.ModelSpec("autoencoder_vq", dict(VAE, norm_groups=8, beta=0.5), 8, 3, None, None),
     "autoencoder_vq beta=0.5 has no diffusers counterpart"),
    (lambda: models.ModelSpec("unet2d_condition", dict(UNET, norm_groups=8), 8, 4, SCHEDULE), "autoencoder None"),
    (lambda: models.ModelSpec("unet", SMALL, 8, 3, SCHEDULE), "non-finite"),
])
def test_what_has_no_counterpart_and_non_finite_params_are_refused_in_one_line(tmp_path, capsys, make, message):
    spec = make()
    _saved(tmp_path / "model", spec, nan=message == "non-finite")
    assert _export(tmp_path / "model", tmp_path / "out") == 2
    _one_line_error(capsys, message)
    assert not (tmp_path / "out").exists() and sorted(os.listdir(tmp_path)) == ["model"]


def test_clip_skip_and_a_missing_tokenizer_are_refused(ours, tmp_path, capsys):
    root, spec, params, tok = ours
    models.save(str(tmp_path / "skip"), dataclasses.replace(spec, clip_skip=1), params, tokenizer=tok)
    assert _export(tmp_path / "skip", tmp_path / "out") == 2
    _one_line_error(capsys, "clip_skip=1 has no counterpart")
    models.save(str(tmp_path / "notok"), spec, params)
    assert _export(tmp_path / "notok", tmp_path / "out") == 2
    _one_line_error(capsys, "text encoder but no tokenizer/")
    assert not (tmp_path / "out").exists()


def test_destinations_and_arguments(ours, tmp_path, capsys):
    root = ours[0]
    model, out = root / "model", tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert _export(model, out) == 2
    _one_line_error(capsys, "destination exists", "--overwrite")
    assert _export(model, out, "--overwrite") == 2
    _one_line_error(capsys, "not a diffusers folder written by an export")
    assert os.listdir(out) == ["notes.txt"]
    (out / "notes.txt").unlink()
    assert _export(model, out, "--overwrite") == 0  # an empty folder is replaced
    before = {f: (out / f).read_bytes() for f in ("unet/config.json", "vae/diffusion_pytorch_model.safetensors")}
    assert _export(model, out) == 2
    _one_line_error(capsys, "destination exists")
    assert _export(model, out, "--overwrite") == 0  # an export is replaced by an export
    assert all((out / f).read_bytes() == b for f, b in before.items())
    (out / "vae" / "extra.bin").write_bytes(b"x")
    assert _export(model, out, "--overwrite") == 2
    _one_line_error(capsys, "refusing to replace")
    (out / "vae" / "extra.bin").unlink()
    # A failed export (non-finite params) leaves the old folder as it was, and nothing beside it.
    bad = _saved(tmp_path / "bad", models.ModelSpec("unet", SMALL, 8, 3, SCHEDULE), nan=True)
    assert _export(bad, out, "--overwrite") == 2
    _one_line_error(capsys, "non-finite")
    assert all((out / f).read_bytes() == b for f, b in before.items())
    assert sorted(os.listdir(tmp_path)) == ["bad", "out"]
    assert _export(tmp_path / "nothing", tmp_path / "o2") == 2
    _one_line_error(capsys, "is not a model directory")
    assert _export(model, tmp_path / "o2", "--format", "ddim") == 2
    _one_line_error(capsys, "--format applies to importing")
    assert _export(model, tmp_path / "o2", "--image-size", "8") == 2
    _one_line_error(capsys, "--image-size applies to importing")
    assert not (tmp_path / "o2").exists()
