"""Stable Diffusion pipelines (ddim_jax.pipelines) against diffusers' torch pipelines built from tiny random
components and converted with our converter: text to image (guidance 1 and 7.5), img2img and a 9-channel
inpainting UNet, the same initial latents and noise given to both. RePaint on the Gaussian-mixture oracle
and on a latent model keeps the known region; DDIM inversion's reconstruction error shrinks with S. A LoRA file
(peft's, saved by diffusers) merged into ours gives diffusers' images after its load_lora_weights, at two scales.
sample.py's text2img, img2img and inpaint modes, their --lora, --height and --width."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddim_jax import concat, convert, loading, lora, models, pipelines
from ddim_jax.oracle import GaussianMixture
from ddim_jax.sampling import ddim_sample, repaint_sample
from ddim_jax.schedules import make_schedule
from ddim_jax.tokenizer import CLIPTokenizer

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

UNET = {"block_out_channels": (16,), "down_block_types": ("CrossAttnDownBlock2D",),
        "up_block_types": ("CrossAttnUpBlock2D",), "layers_per_block": 1, "attention_head_dim": 2,
        "cross_attention_dim": 16, "norm_num_groups": 8, "sample_size": 8}  # one level: quick to compile
B, M, D, SIDE, LAT = 2, 77, 16, 16, 8  # batch, context tokens (CLIP's 77) and width, image side, latent side
S = 4  # sampling steps


def _perturb(*modules):
    with torch.no_grad():  # diffusers zero-initialises some output layers: random weights everywhere
        for mod in modules:
            for p in mod.parameters():
                p.add_(0.05 * torch.randn_like(p))


def _scheduler():
    # SD's DDIM ("leading" spacing, steps_offset 1) landing on alpha-bar 1 as our samplers do.
    return diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   steps_offset=1, timestep_spacing="leading", set_alpha_to_one=True,
                                   clip_sample=False)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """Two tiny SD folders sharing a VAE (a text-to-image UNet, a 9-channel inpainting UNet), converted."""
    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                                  latent_channels=4, norm_num_groups=8, sample_size=SIDE,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2,
                                  scaling_factor=0.3)
    unet = diffusers.UNet2DConditionModel(in_channels=4, out_channels=4, **UNET)
    unet9 = diffusers.UNet2DConditionModel(in_channels=9, out_channels=4, **UNET)
    _perturb(vae, unet, unet9)
    # The text-to-image folder also holds a tiny CLIP text encoder and its tokenizer (lower-case letters, two merges).
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = letters + [c + "</w>" for c in letters] + ["at</w>", "cat</w>", "<|startoftext|>", "<|endoftext|>"]
    (root / "vocab").mkdir()
    (root / "vocab" / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (root / "vocab" / "merges.txt").write_text("#version: 0.2\na t</w>\nc at</w>\n")
    CLIPTokenizer.from_files(root / "vocab" / "vocab.json", root / "vocab" / "merges.txt").save(
        str(root / "sd" / "tokenizer"))
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tokens), hidden_size=D, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=len(tokens) - 2, eos_token_id=2))
    _perturb(text)
    text.save_pretrained(root / "sd" / "text_encoder")
    out = {"root": root, "text_encoder": text.eval()}
    for name, u in (("sd", unet), ("sd_inpaint", unet9)):
        u.save_pretrained(root / name / "unet", safe_serialization=True)
        vae.save_pretrained(root / name / "vae", safe_serialization=True)
        _scheduler().save_pretrained(root / name / "scheduler")
        assert convert.main([str(root / name), str(root / f"{name}_jax")]) == 0
        out[name] = (u.eval(), *loading.load(root / f"{name}_jax"))
    out["vae"] = vae.eval()
    return out


def _torch_pipe(cls, unet, vae, text_encoder=None, tokenizer=None):
    return cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=_scheduler(),
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    ctx = rng.standard_normal((B, M, D)).astype(np.float32)
    null = rng.standard_normal((B, M, D)).astype(np.float32)
    image = rng.uniform(-1, 1, (B, SIDE, SIDE, 3)).astype(np.float32)
    return ctx, null, image


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
    return np.asarray(t).transpose(0, 2, 3, 1)


def _timesteps(pipe_scheduler, steps=S):
    pipe_scheduler.set_timesteps(steps)
    return pipe_scheduler.timesteps.numpy()[::-1].astype(np.int32)


def _images01(x):
    return (np.asarray(x) + 1.0) / 2.0  # ours in [-1, 1]; diffusers' output_type="np" in [0, 1]


def _close(ours, want):
    assert np.abs(want - want.mean()).mean() > 1e-3  # not a flat image
    np.testing.assert_allclose(_images01(ours), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_text_to_image_matches_diffusers(sd, guidance):
    unet, spec, params = sd["sd"]
    ctx, null, _ = _inputs()
    latents = np.random.default_rng(1).standard_normal((B, LAT, LAT, 4)).astype(np.float32)
    pipe = _torch_pipe(diffusers.StableDiffusionPipeline, unet, sd["vae"])
    want = pipe(prompt_embeds=torch.from_numpy(ctx), negative_prompt_embeds=torch.from_numpy(null),
                latents=_nchw(latents), num_inference_steps=S, guidance_scale=guidance, height=SIDE, width=SIDE,
                output_type="np").images
    ours = pipelines.text_to_image(spec, params, ctx, null, guidance=guidance, latents=latents, num_steps=None,
                                   timesteps=_timesteps(_scheduler()))
    _close(ours, want)


def test_prompts_end_to_end_match_diffusers(sd):
    """The converted text encoder and tokenizer: prompts and negative prompts to images, as diffusers does."""
    unet, spec, params = sd["sd"]
    assert spec.text_encoder is not None
    prompts, negative = ["a cat", "cat at a cat"], ["", "cat"]
    latents = np.random.default_rng(9).standard_normal((B, LAT, LAT, 4)).astype(np.float32)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(sd["root"] / "sd" / "tokenizer")
    pipe = _torch_pipe(diffusers.StableDiffusionPipeline, unet, sd["vae"], sd["text_encoder"], tokenizer)
    want = pipe(prompt=prompts, negative_prompt=negative, latents=_nchw(latents), num_inference_steps=S,
                guidance_scale=7.5, height=SIDE, width=SIDE, output_type="np").images
    ctx, null = pipelines.encode_prompts(spec, params, models.load_tokenizer(sd["root"] / "sd_jax"), prompts, negative)
    assert ctx.shape == null.shape == (B, 77, D)
    ours = pipelines.text_to_image(spec, params, ctx, null, guidance=7.5, latents=latents, num_steps=None,
                                   timesteps=_timesteps(_scheduler()))
    _close(ours, want)
    with pytest.raises(ValueError, match="prompts must be a string or a non-empty list"):
        pipelines.encode_prompts(spec, params, models.load_tokenizer(sd["root"] / "sd_jax"), [])
    with pytest.raises(ValueError, match="has no text encoder"):
        pipelines.encode_prompts(sd["sd_inpaint"][1], sd["sd_inpaint"][2], None, ["a cat"])


def test_image_to_image_matches_diffusers(sd):
    unet, spec, params = sd["sd"]
    ctx, null, image = _inputs(2)
    strength = 0.55  # int(8 * 0.55) = 4 of 8 steps (S = 4 model calls: the text-to-image test's program)
    g = torch.Generator().manual_seed(3)  # diffusers draws the posterior sample, then the noise
    enc_noise, noise = torch.randn((B, 4, LAT, LAT), generator=g), torch.randn((B, 4, LAT, LAT), generator=g)
    pipe = _torch_pipe(diffusers.StableDiffusionImg2ImgPipeline, unet, sd["vae"])
    want = pipe(image=_nchw(image), strength=strength, prompt_embeds=torch.from_numpy(ctx),
                negative_prompt_embeds=torch.from_numpy(null), num_inference_steps=2 * S, guidance_scale=7.5,
                generator=torch.Generator().manual_seed(3), output_type="np").images
    tau = _timesteps(_scheduler(), 2 * S)
    assert list(pipelines.start_steps(tau, strength)) == [1, 126, 251, 376]  # diffusers' timesteps[8 - 4:]
    ours = pipelines.image_to_image(spec, params, image, ctx, null, strength=strength, guidance=7.5, num_steps=None,
                                    timesteps=tau, noise=_nhwc(noise), encoder_noise=_nhwc(enc_noise))
    _close(ours, want)


def test_inpainting_unet_converts_and_matches_diffusers(sd):
    unet, spec, params = sd["sd_inpaint"]
    assert spec.concat == "sd_inpaint" and spec.input_channels == 9
    ctx, null, image = _inputs(4)
    mask = np.zeros((B, SIDE, SIDE), np.float32)
    mask[:, 4:12, 6:14] = 1.0  # white = repaint
    mask[1, :3, :] = 0.7  # binarised at 0.5, as diffusers does
    latents = np.random.default_rng(5).standard_normal((B, LAT, LAT, 4)).astype(np.float32)
    enc_noise = torch.randn((B, 4, LAT, LAT), generator=torch.Generator().manual_seed(6))  # the masked image's
    pipe = _torch_pipe(diffusers.StableDiffusionInpaintPipeline, unet, sd["vae"])
    want = pipe(image=_nchw(image), mask_image=torch.from_numpy(mask[:, None]), prompt_embeds=torch.from_numpy(ctx),
                negative_prompt_embeds=torch.from_numpy(null), latents=_nchw(latents), num_inference_steps=S,
                guidance_scale=7.5, height=SIDE, width=SIDE, generator=torch.Generator().manual_seed(6),
                output_type="np").images
    ours = pipelines.inpaint(spec, params, image, mask, ctx, null, guidance=7.5, latents=latents, num_steps=None,
                             timesteps=_timesteps(_scheduler()), encoder_noise=_nhwc(enc_noise))
    _close(ours, want)
    cond = pipelines.inpaint_condition(spec, params, image, mask)
    np.testing.assert_array_equal(cond[..., 0], (mask[:, ::2, ::2] >= 0.5))  # torch's nearest: pixel 2i
    with pytest.raises(ValueError, match=r"mask must be \[16, 16\]"):
        pipelines.inpaint(spec, params, image, mask[:, :8], ctx, null, guidance=7.5, num_steps=2)
    with pytest.raises(ValueError, match="sd_inpaint observations .* need the autoencoder"):
        concat.get("sd_inpaint").observe(image)
    with pytest.raises(ValueError, match="use inpaint"):
        pipelines.text_to_image(spec, params, ctx, num_steps=2)


LORA = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def sd_lora(sd, tmp_path_factory):
    """A random peft LoRA on the text-to-image folder's UNet (attention, proj_in, resnet convolutions; one
    alpha_pattern entry) and text encoder (attention and MLP), saved by diffusers with its adapter metadata."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(2)
    configs = {"unet": LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in",
                                                                       "conv1", "conv2"], alpha_pattern={"to_k": 2}),
               "text_encoder": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "out_proj", "fc1"])}
    layers = {}
    for part, module in (("unet", sd["sd"][0]), ("text_encoder", sd["text_encoder"])):
        module = copy.deepcopy(module)
        # transformers' add_adapter wants a newer peft than the registry has; peft's own injection is the same.
        inject_adapter_in_model(configs[part], module)
        with torch.no_grad():  # peft starts B at zero: a random B makes the update matter
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.3 * torch.randn_like(p))
        layers[part] = get_peft_model_state_dict(module)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        root, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        unet_lora_adapter_metadata=configs["unet"].to_dict(),
        text_encoder_lora_adapter_metadata=configs["text_encoder"].to_dict())
    return root / LORA


def test_a_lora_file_gives_diffusers_images_after_its_load_lora_weights(sd, sd_lora):
    """The prompts test's run (its batch, steps and guidance: its programs) with a LoRA on the UNet and the
    text encoder: diffusers' pipeline loads the file (load_lora_weights; its scale through
    cross_attention_kwargs, which scales the text encoder's layers too), ours merges it (lora.apply_lora)."""
    unet, spec, params = sd["sd"]
    prompts = ["a cat", "cat at a cat"]
    latents = np.random.default_rng(9).standard_normal((B, LAT, LAT, 4)).astype(np.float32)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(sd["root"] / "sd" / "tokenizer")
    pipe = _torch_pipe(diffusers.StableDiffusionPipeline, copy.deepcopy(unet), sd["vae"],
                       copy.deepcopy(sd["text_encoder"]), tokenizer)  # load_lora_weights changes the modules
    pipe.load_lora_weights(str(sd_lora.parent), weight_name=LORA)
    tok = models.load_tokenizer(sd["root"] / "sd_jax")

    def ours(p):
        ctx, null = pipelines.encode_prompts(spec, p, tok, prompts)
        return pipelines.text_to_image(spec, p, ctx, null, guidance=7.5, latents=latents, num_steps=None,
                                       timesteps=_timesteps(_scheduler()))

    without = _images01(ours(params))  # diffusers' images without the LoRA (the prompts test)
    for scale in (1.0, 0.5):
        want = pipe(prompt=prompts, latents=_nchw(latents), num_inference_steps=S, guidance_scale=7.5, height=SIDE,
                    width=SIDE, output_type="np", cross_attention_kwargs={"scale": scale}).images
        assert np.abs(want - without).max() > 0.05  # the LoRA changes the images (500 times the tolerance)
        _close(ours(lora.apply_lora(spec, params, sd_lora, scale=scale)), want)

def test_a_unet_whose_input_channels_are_neither_latents_nor_inpainting_is_refused(sd, tmp_path, capsys):
    import shutil

    src = tmp_path / "sd"
    shutil.copytree(sd["root"] / "sd_inpaint", src)
    config = json.loads((src / "unet" / "config.json").read_text())
    (src / "unet" / "config.json").write_text(json.dumps(dict(config, in_channels=6)))
    assert convert.main([str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "in_channels=6" in err and "allowed: 4, or 9" in err  # the latents' channels, or an inpainting UNet's
    assert "\n" not in err and not (tmp_path / "out").exists()


def test_repaint_keeps_the_known_region_exactly_on_the_oracle():
    mix = GaussianMixture(np.array([[-0.5] * 16, [0.5] * 16]), 0.2)
    schedule = make_schedule("linear", num_timesteps=200)
    eps_fn = mix.eps_fn(schedule)
    known = np.asarray(mix.sample(jax.random.key(0), 64))
    keep = np.zeros(16, bool)
    keep[:6] = True
    x_T = jax.random.normal(jax.random.key(1), known.shape)
    side = np.sign(known[:, :6].mean(1))  # the component the known coordinates show (0.5 apart, std 0.2)
    agree = {}
    for resample in (1, 10):
        x0 = np.asarray(repaint_sample(eps_fn, schedule, x_T, known, keep, 10, key=jax.random.key(2), eta=1.0,
                                       resample=resample))
        np.testing.assert_array_equal(x0[:, keep], known[:, keep])
        agree[resample] = np.mean(np.sign(x0[:, ~keep].mean(1)) == side)
    # The posterior puts the unknown coordinates on the known ones' component; resampling harmonises
    # (RePaint's point): the replacement alone often misses it.
    assert agree[1] < agree[10] and agree[10] >= 0.95
    # No replacement at all (keep nowhere) is DDIM itself.
    free = repaint_sample(eps_fn, schedule, x_T, known, np.zeros(16, bool), 10, key=jax.random.key(2))
    np.testing.assert_allclose(free, ddim_sample(eps_fn, schedule, x_T, 10), atol=1e-6)
    with pytest.raises(ValueError, match="resample must be an integer >= 1"):
        repaint_sample(eps_fn, schedule, x_T, known, keep, 10, key=jax.random.key(2), resample=0)


def test_repaint_on_a_pixel_model_returns_the_image_exactly_where_it_is_known():
    spec = models.ModelSpec("unet", {"ch": 8, "ch_mult": (1,), "num_res_blocks": 1, "norm_groups": 4}, 8, 1,
                            {"name": "cosine", "num_timesteps": 100})
    rng = np.random.default_rng(1)  # random weights drawn on the host (no initialiser to compile)
    params = jax.tree.map(lambda a: jnp.asarray(0.2 * rng.standard_normal(a.shape), jnp.float32), spec.param_shapes())
    image = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 1)).astype(np.float32)
    mask = np.zeros((8, 8), np.float32)
    mask[2:6, 2:6] = 1.0
    out = np.asarray(pipelines.inpaint(spec, params, image, mask, num_steps=5, eta=1.0, resample=2, seed=3))
    known = mask < 0.5
    np.testing.assert_array_equal(out[:, known], image[:, known])
    assert np.abs(out[:, ~known] - image[:, ~known]).mean() > 1e-2 and np.all(np.abs(out) <= 1)


def test_repaint_on_a_latent_model_keeps_the_images_latents(sd):
    _, spec, params = sd["sd"]
    ctx, null, image = _inputs(7)
    mask = np.zeros((SIDE, SIDE), np.float32)
    mask[:, 8:] = 1.0  # repaint the right half
    z = pipelines.inpaint(spec, params, image, mask, ctx, null, guidance=7.5, num_steps=S, decode=False, seed=1)
    z0 = pipelines.encode_images(spec, params, image)
    np.testing.assert_array_equal(np.asarray(z)[:, :, :4], np.asarray(z0)[:, :, :4])  # latent columns 0..3: known
    assert np.abs(np.asarray(z)[:, :, 4:] - np.asarray(z0)[:, :, 4:]).mean() > 1e-2
    with pytest.raises(ValueError, match="RePaint.* runs DDIM"):
        pipelines.inpaint(spec, params, image, mask, ctx, num_steps=3, solver="dpmpp_2m")


def test_ddim_inversion_error_shrinks_with_steps_on_the_oracle():
    mix = GaussianMixture(np.array([[-0.5] * 16, [0.5] * 16]), 0.2)  # the RePaint test's (its S = 10 decoder)
    schedule = make_schedule("linear", num_timesteps=200)
    x0 = mix.sample(jax.random.key(3), 64)
    errors, _ = pipelines.reconstruction_errors(mix.eps_fn(schedule), schedule, x0, (10, 80))
    assert errors[80] < 0.1 * errors[10]  # the ODE's error, -> 0


def test_inversion_and_edit_on_a_latent_model(sd):
    _, spec, params = sd["sd"]
    ctx, null, image = _inputs(8)  # the shapes of the text-to-image test: its S = 4 decoder is reused
    err = pipelines.inversion_error(spec, params, image, ctx, steps=(S,))
    z0 = pipelines.encode_images(spec, params, image)
    x_T = pipelines.invert(spec, params, image, ctx, num_steps=S)
    same = pipelines.edit(spec, params, image, ctx, ctx, edit_guidance=1.0, num_steps=S, decode=False)
    back = pipelines.text_to_image(spec, params, ctx, latents=x_T, num_steps=S, decode=False)  # DDIM from x_T
    np.testing.assert_allclose(same, back, atol=1e-5)
    np.testing.assert_allclose(float(jnp.mean((same - z0) ** 2)), err[S]["latent_mse"], rtol=1e-3)
    assert err[S]["image_mse"] > 0 and np.all(np.isfinite(x_T))
    edited = pipelines.edit(spec, params, image, ctx, ctx[::-1], null, edit_guidance=7.5, num_steps=S, decode=False)
    assert np.abs(np.asarray(edited) - np.asarray(same)).mean() > 1e-3  # the edited prompt changes the result


def test_bad_inputs_are_one_line_errors_naming_the_argument(sd):
    _, spec, params = sd["sd"]
    ctx, _, image = _inputs()
    for strength, needle in ((0.0, "strength must be a number in"), (1.5, "strength must be a number in"),
                             (0.1, r"strength=0.1 with 4 steps leaves no step")):
        with pytest.raises(ValueError, match=needle):
            pipelines.image_to_image(spec, params, image, ctx, num_steps=4, strength=strength)
    with pytest.raises(ValueError, match="image is 9x9: height must be a positive multiple of 2"):
        pipelines.image_to_image(spec, params, image[:, :9, :9], ctx, num_steps=4)
    with pytest.raises(ValueError, match="guidance=7.5 needs null_context"):
        pipelines.text_to_image(spec, params, ctx, guidance=7.5, num_steps=2)
    with pytest.raises(ValueError, match=r"context must be context arrays .* \[B, M, 16\]"):
        pipelines.text_to_image(spec, params, ctx[..., :8], num_steps=2)
    with pytest.raises(ValueError, match="width must be a positive multiple of 2"):
        pipelines.text_to_image(spec, params, ctx, width=17, num_steps=2)


# ---------------------------------------------------------------------------------------------
# sample.py's pipeline modes.


def _cli(*args):
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    import sample

    sample.FLAGS.unparse_flags()
    sample.FLAGS(["sample.py", *args])
    sample.run()


def _png(path, pixels):
    from PIL import Image

    Image.fromarray(pixels).save(path)
    return str(path)


def test_sample_py_text2img_writes_pngs_a_grid_and_the_prompts(sd, tmp_path):
    from ddim_jax.images import to_uint8

    _, spec, params = sd["sd"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\ncat at a cat\n")
    out = tmp_path / "out"
    _cli(f"--checkpoint={sd['root'] / 'sd_jax'}", "--mode=text2img", f"--prompts_file={prompts}", "--steps=4",
         "--negative_prompt=at", "--guidance=3", f"--output={out}")
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000.png", "00001.png"]
    assert (out / "grid.png").is_file()
    assert (out / "prompts.txt").read_text() == "00000.png\ta cat\n00001.png\tcat at a cat\n"
    from PIL import Image

    got = np.stack([np.asarray(Image.open(out / "images" / f"0000{i}.png")) for i in range(2)])
    ctx, null = pipelines.encode_prompts(spec, params, models.load_tokenizer(sd["root"] / "sd_jax"),
                                         ["a cat", "cat at a cat"], "at")
    x_T = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(jax.random.key(0), i), (LAT, LAT, 4)))(jnp.arange(2))
    want = to_uint8(pipelines.text_to_image(spec, params, ctx, null, guidance=3.0, latents=x_T, num_steps=4))
    assert np.abs(got.astype(int) - want).max() <= 1  # the pipeline's images (rounding aside)


def test_sample_py_refuses_bad_pipeline_inputs_in_one_line_and_writes_nothing(sd, tmp_path, capsys):
    rgb = np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    image = _png(tmp_path / "in.png", rgb)
    small = _png(tmp_path / "small.png", rgb[:8, :8])
    mask = _png(tmp_path / "mask.png", np.full((SIDE, SIDE), 255, np.uint8))
    small_mask = _png(tmp_path / "small_mask.png", np.full((8, 8), 255, np.uint8))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    sd15, inpainter = f"--checkpoint={sd['root'] / 'sd_jax'}", f"--checkpoint={sd['root'] / 'sd_inpaint_jax'}"
    out = tmp_path / "out"
    for args, message in [
        ((sd15, "--mode=text2img", f"--prompts_file={empty}"), f"--prompts_file {empty} holds no prompts"),
        ((sd15, "--mode=img2img", "--prompt=a cat", f"--init_image={image}", "--strength=1.5"),
         r"--strength must be in \(0, 1\]"),
        ((sd15, "--mode=img2img", "--prompt=a cat", f"--init_image={image}", "--strength=0"),
         r"--strength must be in \(0, 1\]"),
        ((sd15, "--mode=img2img", "--prompt=a cat", f"--init_image={small}"),
         "--init_image is 8x8; this model takes 16x16 images"),
        ((inpainter, "--mode=inpaint", "--prompt=a cat", f"--init_image={image}", f"--mask={small_mask}"),
         "--mask is 8x8; --init_image is 16x16"),
        ((inpainter, "--mode=inpaint", "--prompt=a cat", f"--init_image={image}", f"--mask={mask}"),
         "--prompt needs a model with a text encoder"),
        ((sd15, "--mode=img2img", "--prompt=a cat"), "--mode=img2img needs --init_image"),
        ((sd15, "--mode=text2img", "--prompt=a cat", f"--mask={mask}"),
         "--mask does not apply to --mode=text2img .*--mode=inpaint"),
        ((sd15, "--mode=text2img"), "needs --prompt or --prompts_file"),
        ((inpainter, "--mode=text2img", "--prompt=a cat"), "use --mode=inpaint"),
    ]:
        with pytest.raises((ValueError, FileNotFoundError), match=message) as e:
            _cli(*args, f"--output={out}")
        assert "\n" not in str(e.value) and not out.exists()


def test_sample_py_img2img_and_inpaint_run(sd, sd_lora, tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    image = _png(tmp_path / "in.png", rgb)
    white = np.zeros((SIDE, SIDE), np.uint8)
    white[:, 8:] = 255  # repaint the right half
    mask = _png(tmp_path / "mask.png", white)
    sd15 = f"--checkpoint={sd['root'] / 'sd_jax'}"
    for extra in (("--mode=img2img", "--strength=0.5", "--steps=8"), ("--mode=inpaint", f"--mask={mask}", "--steps=4")):
        out = tmp_path / extra[0][7:]
        _cli(sd15, *extra, "--prompt=a cat", f"--init_image={image}", "--num_samples=2", f"--lora={sd_lora}",
             f"--output={out}")
        assert sorted(p.name for p in (out / "images").iterdir()) == ["00000.png", "00001.png"]
        assert (out / "prompts.txt").read_text() == "00000.png\ta cat\n00001.png\ta cat\n"


def test_sample_py_text2img_merges_a_lora_at_a_size(sd, sd_lora, tmp_path):
    """--lora at --lora_scale, --height x --width: the images of the pipeline on the merged params (the LoRA test
    checks those against diffusers) from the CLI's latents, and not the images without the LoRA."""
    from PIL import Image

    from ddim_jax.images import to_uint8

    _, spec, params = sd["sd"]
    out = tmp_path / "out"
    args = (f"--checkpoint={sd['root'] / 'sd_jax'}", "--mode=text2img", "--prompt=a cat", "--num_samples=2",
            "--steps=4", f"--lora={sd_lora}", "--lora_scale=0.5", "--height=16", "--width=24")
    _cli(*args, f"--output={out}")
    got = np.stack([np.asarray(Image.open(out / "images" / f"0000{i}.png")) for i in range(2)])
    assert got.shape == (2, 16, 24, 3)
    x_T = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(jax.random.key(0), i), (8, 12, 4)))(jnp.arange(2))
    tok = models.load_tokenizer(sd["root"] / "sd_jax")

    def images(p):
        ctx, null = pipelines.encode_prompts(spec, p, tok, ["a cat"] * 2)
        return to_uint8(pipelines.text_to_image(spec, p, ctx, null, guidance=7.5, latents=x_T, num_steps=4,
                                                height=16, width=24)).astype(int)

    assert np.abs(got - images(lora.apply_lora(spec, params, sd_lora, scale=0.5))).max() <= 1
    assert np.abs(got - images(params)).mean() > 4  # the LoRA changes the images (12 levels of 255 on average)
    import sample

    assert sample.Settings.from_flags().output_name == "text2img_lora-pytorch_lora_weights-0.5_h16_w24"


def test_sample_py_refuses_bad_lora_and_size_flags_in_one_line_and_writes_nothing(sd, sd_lora, tmp_path):
    from safetensors.numpy import save_file

    other = str(tmp_path / "other.safetensors")  # a module this UNet does not have (one level, not two)
    save_file({"unet.down_blocks.1.attentions.0.proj_in.lora_A.weight": np.ones((4, 32, 1, 1), np.float32),
               "unet.down_blocks.1.attentions.0.proj_in.lora_B.weight": np.ones((32, 4, 1, 1), np.float32)}, other)
    pickled = tmp_path / "lora.bin"
    pickled.write_bytes(b"")
    sd15, text = f"--checkpoint={sd['root'] / 'sd_jax'}", ("--mode=text2img", "--prompt=a cat")
    out = tmp_path / "out"
    for args, message in [
        ((*text, f"--lora={tmp_path / 'missing.safetensors'}"), "^--lora .*missing.safetensors does not exist$"),
        ((*text, f"--lora={pickled}"), r"^--lora .*lora\.bin: LoRA weights are read from \.safetensors files only"),
        ((*text, f"--lora={other}"), r"^--lora .*other\.safetensors: key .* adapts module 'down_blocks\.1\.attentions"
                                     r"\.0\.proj_in', which this model's unet does not have \(a LoRA for another"),
        ((*text, "--lora_scale=0.5"), "^--lora_scale scales --lora; give a LoRA file with --lora$"),
        ((*text, f"--lora={sd_lora}", "--lora_scale=nan"), "^--lora_scale must be a finite number"),
        (("--mode=sample", f"--lora={sd_lora}"), r"^--lora does not apply to --mode=sample \(it applies to "
                                                 "--mode=text2img, img2img, inpaint\\)$"),
        ((*text, "--height=9"), r"^--height must be a positive multiple of 2 \(the autoencoder's factor 2 times the "
                                r"denoiser's 1\); got 9$"),
        ((*text, "--width=0"), "^--width must be a positive number of pixels; got 0$"),
        (("--mode=img2img", "--prompt=a cat", "--height=16"), r"^--height does not apply to --mode=img2img \(it "
                                                              r"applies to --mode=text2img\)$"),
    ]:
        with pytest.raises((ValueError, FileNotFoundError), match=message) as e:
            _cli(sd15, *args, f"--output={out}")
        assert "\n" not in str(e.value) and not out.exists()
