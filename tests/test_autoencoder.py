"""The KL autoencoder (``ddim_jax.autoencoder``) against diffusers' AutoencoderKL: parameter layout at
Stable Diffusion's size (no allocation), and numerical parity at a small random config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ddim_jax import autoencoder, convert

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def _diffusers_vae(block_out_channels, layers_per_block, latent_channels, norm_groups, in_channels=3):
    n = len(block_out_channels)
    return diffusers.AutoencoderKL(in_channels=in_channels, out_channels=in_channels,
                                   down_block_types=("DownEncoderBlock2D",) * n,
                                   up_block_types=("UpDecoderBlock2D",) * n,
                                   block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                                   latent_channels=latent_channels, norm_num_groups=norm_groups)


@pytest.mark.parametrize("preset,channels,count", [
    ("SD_VAE", 3, 83_653_863),  # diffusers' count for Stable Diffusion's VAE
    ("LDM_KL_F4", 3, None),
    ("DIGITS_F4", 1, None),
])
def test_presets_have_diffusers_parameters_key_for_key(preset, channels, count):
    arch = getattr(autoencoder, preset)
    with torch.device("meta"):  # shapes only: no 84M-parameter allocation
        ref = _diffusers_vae(**arch, in_channels=channels)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    model = autoencoder.AutoencoderKL(**arch, in_channels=channels)
    shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 8, 8, channels)))["params"], jax.random.key(0))
    flat = traverse_util.flatten_dict(shapes)
    total = sum(int(np.prod(s.shape)) for s in flat.values())
    assert total == sum(int(np.prod(s)) for s in want.values())
    assert count is None or total == count
    got = {}
    for path, s in flat.items():
        shape = tuple(s.shape)  # ours HWIO / IO; diffusers OIHW / OI
        got[convert.diffusers_key(path)] = (shape[::-1][:2] + shape[:2] if len(shape) == 4 else shape[::-1])
    assert got == want


def test_small_autoencoder_matches_diffusers():
    torch.manual_seed(0)
    arch = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_groups=8)
    ref = _diffusers_vae(**arch).eval()
    with torch.no_grad():  # diffusers zero-initialises nothing here, but make every weight matter
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    params = convert.convert_autoencoder_kl(ref.state_dict(), **arch)
    model = autoencoder.AutoencoderKL(**arch)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
        posterior = ref.encode(xt).latent_dist
        mean_ref, logvar_ref = posterior.mean.numpy(), posterior.logvar.numpy()
        rec_ref = ref.decode(posterior.mean).sample.numpy().transpose(0, 2, 3, 1)
    mean, logvar = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))(params, x)
    assert mean.shape == (2, 8, 8, 4)
    np.testing.assert_allclose(np.asarray(mean), mean_ref.transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(logvar), logvar_ref.transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-4)
    rec = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)
    np.testing.assert_allclose(np.asarray(rec), rec_ref, atol=1e-4, rtol=1e-4)
    assert np.abs(rec_ref).max() > 0.1  # the comparison is not between zeros
    # A state dict that does not fit is refused by key.
    sd = dict(ref.state_dict())
    sd.pop("decoder.conv_in.bias")
    with pytest.raises(convert.ConversionError, match="missing key 'decoder.conv_in.bias'"):
        convert.convert_autoencoder_kl(sd, **arch)


def test_small_vq_autoencoder_matches_diffusers():
    torch.manual_seed(0)
    arch = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, num_embeddings=16, embedding_dim=3,
                norm_groups=8)
    ref = diffusers.VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                            latent_channels=4, num_vq_embeddings=16, vq_embed_dim=3, norm_num_groups=8).eval()
    ref.quantize.legacy = False  # beta on the commitment term, as the VQ-VAE paper (and ddim_jax) put it
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    params = convert.convert_autoencoder_vq(ref.state_dict(), **arch)
    model = autoencoder.AutoencoderVQ(**arch)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        h = ref.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latents
        z_q_ref, loss_ref, (_, _, idx_ref) = ref.quantize(h)
        rec_ref = ref.decode(h).sample.numpy().transpose(0, 2, 3, 1)
    z = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))(params, x)
    np.testing.assert_allclose(np.asarray(z), h.numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-4)
    quantize = jax.jit(lambda p, z: model.apply({"params": p}, z, method=lambda m, z: m.quantize(z)))
    z_q, loss, idx = quantize(params, z)
    assert len(np.unique(np.asarray(idx))) > 3  # several codes in use: the comparison means something
    np.testing.assert_array_equal(np.asarray(idx).ravel(), idx_ref.numpy().ravel())
    np.testing.assert_allclose(np.asarray(z_q), z_q_ref.numpy().transpose(0, 2, 3, 1), atol=1e-5)
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-4)
    rec = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)
    np.testing.assert_allclose(np.asarray(rec), rec_ref, atol=1e-4, rtol=1e-4)


def test_vector_quantizer_passes_gradients_straight_through():
    vq = autoencoder.VectorQuantizer(num_embeddings=8, embedding_dim=2, beta=0.25)
    z = jax.random.normal(jax.random.key(0), (1, 3, 3, 2))
    params = vq.init(jax.random.key(1), z)["params"]
    e = params["embedding"]["embedding"]
    z_q, loss, idx = vq.apply({"params": params}, z)
    nearest = np.argmin(((np.asarray(z).reshape(-1, 1, 2) - np.asarray(e)[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(np.asarray(idx).ravel(), nearest)
    # d(sum z_q)/dz is the identity (straight through); the loss pulls z towards its code with weight beta
    # and the code towards z with weight 1.
    g = jax.grad(lambda z: jnp.sum(vq.apply({"params": params}, z)[0]))(z)
    np.testing.assert_allclose(g, np.ones_like(z))
    gz = jax.grad(lambda z: vq.apply({"params": params}, z)[1])(z)
    np.testing.assert_allclose(gz, 0.25 * 2 * (z - z_q) / z.size, rtol=1e-5, atol=1e-7)
    ge = jax.grad(lambda p: vq.apply({"params": p}, z)[1])(params)["embedding"]["embedding"]
    want = np.zeros_like(np.asarray(e))
    np.add.at(want, nearest, 2 * (np.asarray(z_q) - np.asarray(z)).reshape(-1, 2) / z.size)
    np.testing.assert_allclose(ge, want, rtol=1e-5, atol=1e-7)
