"""Our scan sampler against diffusers' DDIMScheduler, both driving the same network (a small
UNet2DModel with random weights, saved as a diffusers pipeline, converted to a ddim_jax model
directory and loaded back), and our schedules against the diffusers schedules they are converted from."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddim_jax as dj
from ddim_jax import convert as conv
from ddim_jax import loading, models

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SMALL = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
             down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
             attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
             norm_num_groups=32, act_fn="silu", time_embedding_type="positional")


def _pipeline(path, net, scheduler):
    """``path`` laid out as a diffusers pipeline: unet/ and scheduler/ as save_pretrained writes them."""
    net.save_pretrained(path / "unet")
    scheduler.save_pretrained(path / "scheduler")
    return path


@pytest.fixture(scope="module")
def networks(tmp_path_factory):
    torch.manual_seed(0)
    net = diffusers.UNet2DModel(**SMALL).eval()
    with torch.no_grad():  # perturb every parameter so no output is trivially zero
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                                    beta_end=0.02)
    src = _pipeline(tmp_path_factory.mktemp("pipeline"), net, sched)
    conv.convert(src, src / "converted")
    spec, params = loading.load(src / "converted")
    return net, spec, spec.eps_fn(params)


def _torch_eps_fn(net):
    """The torch network itself as an eps_fn (through a host callback), so both samplers see
    bitwise-identical model outputs and only the samplers are compared."""

    def host(x, t):
        with torch.no_grad():
            out = net(torch.as_tensor(np.array(x).transpose(0, 3, 1, 2)), torch.as_tensor(np.array(t[0]))).sample
        return out.numpy().transpose(0, 2, 3, 1)

    return lambda x, t: jax.pure_callback(host, jax.ShapeDtypeStruct(x.shape, jnp.float32), x, t)


def _compare_trajectories(sched, net, eps_fn, schedule, prediction_type, S, spacing, eta, clip, tol):
    """Runs our sampler and diffusers' scheduler from the same x_T with the same noise; compares every step."""
    B = 2
    T = schedule.num_timesteps
    x_T = jax.random.normal(jax.random.key(1), (B, 16, 16, 3))
    key = jax.random.key(2)
    x0, xs, _ = dj.ddim_sample(eps_fn, schedule, x_T, S, spacing=spacing, eta=eta, key=key if eta else None,
                               clip_x0=1.0 if clip else None, prediction_type=prediction_type,
                               return_trajectory=True)
    sched.set_timesteps(S)
    np.testing.assert_array_equal(sched.timesteps.numpy(), dj.make_timesteps(T, S, spacing)[::-1])
    x = torch.as_tensor(np.array(x_T).transpose(0, 3, 1, 2))
    for i, t in enumerate(sched.timesteps):
        with torch.no_grad():
            out = net(x, t).sample
        # The same noise our sampler drew at step i: normal(fold_in(key, i)).
        z = torch.as_tensor(np.array(jax.random.normal(jax.random.fold_in(key, i), x_T.shape)).transpose(0, 3, 1, 2))
        # Clipping re-derives eps from the clipped x0 in our step: diffusers calls that use_clipped_model_output.
        x = sched.step(out, t, x, eta=eta, variance_noise=z if eta else None, use_clipped_model_output=clip).prev_sample
        # Tolerances are relative to the trajectory's scale (this random network drives |x| up to ~10).
        ref = x.numpy()
        np.testing.assert_allclose(np.asarray(xs[i]).transpose(0, 3, 1, 2), ref, rtol=0,
                                   atol=tol * max(1.0, np.abs(ref).max()), err_msg=f"step {i} (t = {int(t)})")
    np.testing.assert_allclose(np.asarray(x0).transpose(0, 3, 1, 2), x.numpy(), rtol=0,
                               atol=tol * max(1.0, np.abs(x.numpy()).max()))


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta,clip", [(0.0, False), (0.6, True)])
@pytest.mark.parametrize("model", ["same torch network", "converted network"])
def test_sampler_reproduces_diffusers_ddim_trajectories(networks, spacing, eta, clip, model):
    net, spec, converted = networks
    eps_fn = converted if model == "converted network" else _torch_eps_fn(net)
    # Same model outputs: float32 round-off of the step alone (doubled with clipping, whose eps is re-derived
    # from the clipped x0 by dividing by sqrt(1 - alpha_bar_t), as small as 0.01 here). Converted network: plus
    # the network's own round-off, carried along the trajectory.
    tol = (2e-5 if clip else 1e-5) if model == "same torch network" else 5e-5
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                    timestep_spacing=spacing, clip_sample=clip, set_alpha_to_one=True)
    # The converted model carries the pipeline's schedule, in our names.
    assert spec.schedule == {"name": "linear", "num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02}
    assert spec.prediction_type == "epsilon"
    schedule = spec.make_schedule()
    np.testing.assert_allclose(schedule.betas, sched.betas.numpy(), rtol=1e-6, atol=0)  # float32 linspace
    _compare_trajectories(sched, net, eps_fn, schedule, spec.prediction_type, 10, spacing, eta, clip, tol)


def test_converted_v_prediction_zero_snr_pipeline_samples_like_diffusers(networks, tmp_path):
    """A pipeline with diffusers' cosine schedule, zero terminal SNR and v prediction: the converted
    spec's schedule and prediction type drive our sampler along diffusers' trajectory."""
    net, _, _ = networks
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                    rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                    timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)
    spec = conv.convert(_pipeline(tmp_path, net, sched), tmp_path / "converted")
    assert loading.load(tmp_path / "converted")[0] == spec
    assert spec.schedule == {"name": "cosine", "num_timesteps": 1000, "rescale_zero_terminal_snr": True}
    assert spec.prediction_type == "v"
    schedule = spec.make_schedule()
    assert schedule.zero_terminal_snr
    np.testing.assert_allclose(schedule.alphas_cumprod, sched.alphas_cumprod.numpy(), rtol=0, atol=2e-6)
    _compare_trajectories(sched, net, _torch_eps_fn(net), schedule, spec.prediction_type, 10, "trailing",
                          0.0, False, 1e-5)


# ----------------------------------------------------------------------------------------------
# Schedules: each diffusers beta_schedule converts to ours and gives diffusers' own betas


@pytest.mark.parametrize("config,name", [
    ({}, "linear"),
    ({"beta_schedule": "linear", "beta_start": 2e-4, "beta_end": 0.03, "num_train_timesteps": 500}, "linear"),
    ({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}, "scaled_linear"),
    ({"beta_schedule": "scaled_linear"}, "scaled_linear"),  # diffusers' defaults 1e-4 .. 0.02, not ours
    ({"beta_schedule": "squaredcos_cap_v2", "beta_start": 0.5, "num_train_timesteps": 4000}, "cosine"),
    ({"beta_schedule": "sigmoid", "beta_start": 1e-4, "beta_end": 0.02}, "sigmoid"),
    ({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "rescale_betas_zero_snr": True},
     "scaled_linear"),
    ({"trained_betas": list(np.linspace(1e-3, 0.05, 200))}, "custom"),
], ids=["defaults", "linear", "scaled_linear", "scaled_linear-defaults", "squaredcos_cap_v2", "sigmoid",
        "zero_snr", "trained_betas"])
def test_diffusers_schedules_convert_to_the_same_betas(config, name):
    schedule, prediction_type = conv.diffusers_schedule(config)
    assert schedule["name"] == name and prediction_type == "epsilon"
    assert schedule.get("rescale_zero_terminal_snr", False) == config.get("rescale_betas_zero_snr", False)
    ours = models.ModelSpec("unet", {}, 8, 3, schedule).make_schedule()  # what a loaded spec builds
    ref = diffusers.DDPMScheduler(**config)
    assert ours.num_timesteps == len(ref.betas)
    # diffusers rescales in float32 (1 - a ratio of nearly equal alpha-bars); we do it in float64.
    tol = dict(rtol=0, atol=1e-5) if config.get("rescale_betas_zero_snr") else dict(rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ours.betas, ref.betas.numpy(), **tol)
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=0, atol=2e-6)
