"""The cross-attention UNet (``ddim_jax.cond_unet``) against diffusers' UNet2DConditionModel: Stable
Diffusion 1.5's parameter layout key for key (no allocation), and numerical parity at small random configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ddim_jax import cond_unet, convert, loading

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def _diffusers_unet(arch):
    a = dict(arch)
    return diffusers.UNet2DConditionModel(
        in_channels=a["in_channels"], out_channels=a["out_channels"], down_block_types=a["down_block_types"],
        up_block_types=a["up_block_types"], block_out_channels=a["block_out_channels"],
        layers_per_block=a["layers_per_block"], attention_head_dim=a["attention_head_dim"],
        cross_attention_dim=a["cross_attention_dim"], norm_num_groups=a["norm_groups"], norm_eps=a["norm_eps"],
        use_linear_projection=a.get("use_linear_projection", False), flip_sin_to_cos=a["flip_sin_to_cos"],
        freq_shift=a["freq_shift"], num_class_embeds=a.get("num_class_embeds"))


def test_sd15_unet_has_diffusers_parameters_key_for_key():
    with torch.device("meta"):  # shapes only: no 860M-parameter allocation
        ref = _diffusers_unet(cond_unet.SD15)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    model = cond_unet.UNet2DCondition(**cond_unet.SD15)
    shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 32, 32, 4)), jnp.zeros((1,)),
                                                 jnp.zeros((1, 1, 768)))["params"], jax.random.key(0))
    flat = traverse_util.flatten_dict(shapes)
    total = sum(int(np.prod(s.shape)) for s in flat.values())
    assert total == sum(int(np.prod(s)) for s in want.values()) == 859_520_964  # SD 1.5's UNet
    got = {}
    for path, s in flat.items():
        shape = tuple(s.shape)  # ours HWIO / IO; diffusers OIHW / OI (1x1 convs: OI11)
        if len(shape) == 4:
            shape = (shape[3], shape[2], shape[0], shape[1])
        elif len(shape) == 2 and path[-1] == "kernel":
            shape = shape[::-1]
        got[convert.cond_unet_key(path)] = shape
    assert got == want


SMALL = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=2,
             cross_attention_dim=16, in_channels=4, out_channels=4, norm_groups=8, norm_eps=1e-5,
             flip_sin_to_cos=True, freq_shift=0)


@pytest.mark.parametrize("variant", [
    dict(use_linear_projection=False),
    dict(use_linear_projection=True, num_class_embeds=5, down_block_types=("CrossAttnDownBlock2D",) * 2,
         up_block_types=("CrossAttnUpBlock2D",) * 2, attention_head_dim=(2, 4), flip_sin_to_cos=False, freq_shift=1),
])
def test_small_unet_matches_diffusers(variant):
    arch = dict(SMALL, **variant)
    torch.manual_seed(0)
    ref = _diffusers_unet(arch).eval()
    with torch.no_grad():  # make every weight matter (diffusers zero-initialises nothing here, but perturb anyway)
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    params = convert.convert_unet2d_condition(ref.state_dict(), **arch)
    model = cond_unet.UNet2DCondition(**arch)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 5, 16)).astype(np.float32)
    t = np.array([10, 900])
    y = np.array([1, 3]) if arch.get("num_class_embeds") else None
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t), torch.from_numpy(ctx),
                   class_labels=None if y is None else torch.from_numpy(y)).sample.numpy().transpose(0, 2, 3, 1)
    apply = jax.jit(lambda p, c: model.apply({"params": p}, x, t, c, y))  # one program for both contexts
    got = apply(params, ctx)
    assert np.abs(want).mean() > 0.05  # not a comparison of near-zeros
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)
    # The context reaches the output.
    other = apply(params, ctx[::-1])
    assert np.abs(np.asarray(other) - np.asarray(got)).max() > 1e-3


def test_a_missing_key_is_refused_by_name():
    ref = _diffusers_unet(SMALL)
    sd = dict(ref.state_dict())
    sd.pop("time_embedding.linear_1.weight")
    with pytest.raises(convert.ConversionError, match="missing key 'time_embedding.linear_1.weight'"):
        convert.convert_unet2d_condition(sd, **SMALL)


def _sd_folder(root, **unet_config_changes):
    """A Stable Diffusion folder in diffusers' pipeline layout at a small random size (safetensors)."""
    torch.manual_seed(0)
    unet = _diffusers_unet(SMALL)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                                  latent_channels=4, norm_num_groups=8, sample_size=16,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2,
                                  scaling_factor=0.3)
    with torch.no_grad():  # diffusers zero-initialises some output layers: random weights everywhere
        for p in list(unet.parameters()) + list(vae.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    unet.register_to_config(sample_size=8, **unet_config_changes)
    unet.save_pretrained(root / "unet", safe_serialization=True)
    vae.save_pretrained(root / "vae", safe_serialization=True)
    diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                            prediction_type="epsilon").save_pretrained(root / "scheduler")
    return unet.eval(), vae.eval()


def test_a_stable_diffusion_folder_converts_to_one_latent_model(tmp_path):
    """The folder's parts become one latent model's spec; its networks' outputs against diffusers' pipelines
    (UNet with context, guidance, the VAE's decoder) are tests/test_pipelines.py's."""
    _sd_folder(tmp_path / "sd")
    assert convert.main([str(tmp_path / "sd"), str(tmp_path / "out")]) == 0
    spec, params = loading.load(tmp_path / "out")
    assert spec.kind == "unet2d_condition" and spec.scale_factor == 0.3 and spec.sample_shape == (8, 8, 4)
    assert spec.output_shape == (16, 16, 3) and spec.schedule["name"] == "scaled_linear"
    assert spec.autoencoder.kind == "autoencoder_kl" and spec.text_encoder is None
    assert set(params) == {"denoiser", "autoencoder"}
    with pytest.raises(ValueError, match=r"conditions on context arrays .* of shape \[B, M, 16\]"):
        spec.eps_fn(params)
    with pytest.raises(ValueError, match="guidance needs null_context"):
        spec.eps_fn(params, np.zeros((2, 7, 16), np.float32), 3.0)


def test_a_stable_diffusion_folder_with_an_unsupported_setting_is_refused(tmp_path, capsys):
    _sd_folder(tmp_path / "sd", class_embed_type="timestep")
    assert convert.main([str(tmp_path / "sd"), str(tmp_path / "out")]) == 2
    assert "class_embed_type='timestep' is not supported" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
