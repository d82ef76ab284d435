"""Our scan sampler against diffusers' DDIMScheduler, both driving the same network (a small
UNet2DModel with random weights, converted to our UNet)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddim_jax as dj
from ddim_jax import convert as conv
from ddim_jax.unet import UNet, make_eps_fn

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SMALL = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
             down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
             attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
             norm_num_groups=32, act_fn="silu", time_embedding_type="positional")


@pytest.fixture(scope="module")
def networks():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    net = diffusers.UNet2DModel(**SMALL).eval()
    with torch.no_grad():  # perturb every parameter so no output is trivially zero
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    kwargs, params = conv.convert_diffusers(net.state_dict(), dict(net.config))
    return net, make_eps_fn(UNet(**kwargs), jax.tree.map(jnp.asarray, params))


def _torch_eps_fn(net):
    """The torch network itself as an eps_fn (through a host callback), so both samplers see
    bitwise-identical model outputs and only the samplers are compared."""

    def host(x, t):
        with torch.no_grad():
            out = net(torch.as_tensor(np.array(x).transpose(0, 3, 1, 2)), torch.as_tensor(np.array(t[0]))).sample
        return out.numpy().transpose(0, 2, 3, 1)

    return lambda x, t: jax.pure_callback(host, jax.ShapeDtypeStruct(x.shape, jnp.float32), x, t)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta,clip", [(0.0, False), (0.6, True)])
@pytest.mark.parametrize("model", ["same torch network", "converted network"])
def test_sampler_reproduces_diffusers_ddim_trajectories(networks, spacing, eta, clip, model):
    net, converted = networks
    eps_fn = converted if model == "converted network" else _torch_eps_fn(net)
    # Same model outputs: float32 round-off of the step alone. Converted network: plus the
    # network's own round-off, carried along the trajectory.
    tol = 1e-5 if model == "same torch network" else 5e-5
    T, S, B = 1000, 10, 2
    schedule = dj.make_schedule("linear", T)
    x_T = jax.random.normal(jax.random.key(1), (B, 16, 16, 3))
    key = jax.random.key(2)
    x0, xs, _ = dj.ddim_sample(eps_fn, schedule, x_T, S, spacing=spacing, eta=eta, key=key if eta else None,
                               clip_x0=1.0 if clip else None, return_trajectory=True)

    sched = diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                    timestep_spacing=spacing, clip_sample=clip, set_alpha_to_one=True)
    sched.set_timesteps(S)
    np.testing.assert_array_equal(sched.timesteps.numpy(), dj.make_timesteps(T, S, spacing)[::-1])
    x = torch.as_tensor(np.array(x_T).transpose(0, 3, 1, 2))
    for i, t in enumerate(sched.timesteps):
        with torch.no_grad():
            eps = net(x, t).sample
        # The same noise our sampler drew at step i: normal(fold_in(key, i)).
        z = torch.as_tensor(np.array(jax.random.normal(jax.random.fold_in(key, i), x_T.shape)).transpose(0, 3, 1, 2))
        # Clipping re-derives eps from the clipped x0 in our step: diffusers calls that use_clipped_model_output.
        x = sched.step(eps, t, x, eta=eta, variance_noise=z if eta else None, use_clipped_model_output=clip).prev_sample
        # Tolerances are relative to the trajectory's scale (this random network drives |x| up to ~10).
        ref = x.numpy()
        np.testing.assert_allclose(np.asarray(xs[i]).transpose(0, 3, 1, 2), ref, rtol=0,
                                   atol=tol * max(1.0, np.abs(ref).max()), err_msg=f"step {i} (t = {int(t)})")
    np.testing.assert_allclose(np.asarray(x0).transpose(0, 3, 1, 2), x.numpy(), rtol=0,
                               atol=tol * max(1.0, np.abs(x.numpy()).max()))
