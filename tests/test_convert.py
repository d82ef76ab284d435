"""Checkpoint conversion: parity with diffusers' UNet2DModel and with ermongroup/ddim's Model, file handling."""

import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ddim_jax import convert as conv
from ddim_jax import loading
from ddim_jax.diffusion import PREDICTION_TYPES
from ddim_jax.schedules import SCHEDULES
from ddim_jax.unet import PRESETS, UNet, count_params, param_shapes

CIFAR10_DIFFUSERS = dict(  # google/ddpm-cifar10-32's config.json
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32,
    act_fn="silu", center_input_sample=False, mid_block_scale_factor=1, time_embedding_type="positional",
)
SMALL_DIFFUSERS = {**CIFAR10_DIFFUSERS, "sample_size": 16, "block_out_channels": (32, 64), "layers_per_block": 1,
                   "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
                   "up_block_types": ("AttnUpBlock2D", "UpBlock2D"), "num_class_embeds": 5,
                   "norm_num_groups": 8}  # 4 and 8 channels per group, as configs/digits.py


_call_eps = jax.jit(lambda eps_fn, x, t: eps_fn(x, t))


def _arch(preset, **changes):
    """A UNet preset as a ModelSpec's arch (out_ch and num_classes are the spec's channels and num_classes)."""
    return {k: v for k, v in {**PRESETS[preset], **changes}.items() if k not in ("out_ch", "num_classes")}


@functools.lru_cache(maxsize=None)
def _jitted_apply(model):
    return jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))


def _jax_eps(spec, params, x_nchw, t, y=None):
    """The spec's network on NCHW numpy input, returned as NCHW numpy. One program per network and shapes, the
    dropout rate aside (inference does not apply it): the CIFAR-10 network's two parity tests share it."""
    fn = _jitted_apply(spec.build().clone(dropout=0.0))
    y = None if y is None else jnp.asarray(y, jnp.int32)
    out = fn(params, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)), jnp.asarray(t, jnp.int32), y)
    return np.asarray(out).transpose(0, 3, 1, 2)


# ----------------------------------------------------------------------------------------------
# diffusers


def _diffusers_model(config, seed=0):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**config).eval()
    with torch.no_grad():  # move every param (GroupNorm scales, zero biases) off its init value
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _diffusers_eps(model, x, t, y=None):
    import torch

    with torch.no_grad():
        y = None if y is None else torch.as_tensor(y)
        return model(torch.as_tensor(x), torch.as_tensor(t), class_labels=y).sample.numpy()


@pytest.mark.slow
def test_diffusers_cifar10_parity():
    model = _diffusers_model(CIFAR10_DIFFUSERS)
    spec, params = conv.convert_diffusers(model.state_dict(), dict(model.config))
    assert spec.arch == _arch("cifar10", dropout=0.0)
    assert (spec.image_size, spec.channels, spec.num_classes) == (32, 3, None)
    assert (spec.schedule, spec.prediction_type) == (conv.DDPM_SCHEDULE, "epsilon")  # no scheduler config: DDPM's
    assert count_params(params) == 35_746_307
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)  # the DDIM parity's batch
    t = np.array([421, 999])  # t = 0 and 1 in the small parity test below
    ref = _diffusers_eps(model, x, t)
    out = _jax_eps(spec, params, x, t)
    assert np.abs(ref).max() > 0.5
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)


def test_diffusers_small_parity_with_class_labels():
    model = _diffusers_model(SMALL_DIFFUSERS, seed=1)
    spec, params = conv.convert_diffusers(model.state_dict(), dict(model.config))
    assert spec.arch == dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0,
                             resamp_with_conv=True, norm_groups=8)
    assert (spec.image_size, spec.channels, spec.num_classes) == (16, 3, 5)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3, 16, 16)).astype(np.float32)
    t, y = np.array([0, 1, 500, 999]), np.array([0, 4, 2, 2])
    np.testing.assert_allclose(_jax_eps(spec, params, x, t, y), _diffusers_eps(model, x, t, y), rtol=0, atol=1e-4)


def test_diffusers_legacy_attention_key_names():
    model = _diffusers_model(SMALL_DIFFUSERS, seed=2)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    legacy = {}
    for k, v in sd.items():
        for new, old in ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."), (".to_out.0.", ".proj_attn.")):
            k = k.replace(new, old)
        legacy[k] = v
    assert "down_blocks.1.attentions.0.proj_attn.weight" in legacy
    _, a = conv.convert_diffusers(sd, dict(model.config))
    _, b = conv.convert_diffusers(legacy, dict(model.config))
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("field,value,needle", [
    ("downsample_padding", 1, "downsample_padding=1"),
    ("attention_head_dim", 8, "attention_head_dim=8"),
    ("flip_sin_to_cos", True, "flip_sin_to_cos=True"),
    ("norm_eps", 1e-5, "norm_eps=1e-05"),
    ("norm_num_groups", 48, "norm_num_groups=48 .*dividing every block's channels"),
    ("up_block_types", ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), "up_block_types"),
    ("out_channels", 6, "out_channels=6 .*in_channels=3"),  # learned variance: not a spec's network
])
def test_diffusers_unsupported_config_is_named(field, value, needle):
    with pytest.raises(conv.ConversionError, match=needle.replace("(", r"\(")):
        conv.convert_diffusers({}, {**CIFAR10_DIFFUSERS, field: value})


# ----------------------------------------------------------------------------------------------
# ermongroup/ddim Model: key names and shapes written out here, plus a small torch reference forward


def ddim_state_dict_shapes(ch, ch_mult, num_res_blocks, attn_levels, in_ch=3, out_ch=3):
    """{key: shape} of ermongroup/ddim's Model (models/diffusion.py) for this architecture."""
    shapes, temb = {}, 4 * ch

    def conv(name, cin, cout, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def resblock(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        shapes[f"{name}.temb_proj.weight"], shapes[f"{name}.temb_proj.bias"] = (cout, temb), (cout,)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for sub in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{sub}", c, c, 1)

    shapes["temb.dense.0.weight"], shapes["temb.dense.0.bias"] = (temb, ch), (temb,)
    shapes["temb.dense.1.weight"], shapes["temb.dense.1.bias"] = (temb, temb), (temb,)
    conv("conv_in", in_ch, ch, 3)
    chans, c = [ch], ch
    for lv, mult in enumerate(ch_mult):
        for i in range(num_res_blocks):
            resblock(f"down.{lv}.block.{i}", c, ch * mult)
            c = ch * mult
            chans.append(c)
            if lv in attn_levels:
                attn(f"down.{lv}.attn.{i}", c)
        if lv != len(ch_mult) - 1:
            conv(f"down.{lv}.downsample.conv", c, c, 3)
            chans.append(c)
    resblock("mid.block_1", c, c)
    attn("mid.attn_1", c)
    resblock("mid.block_2", c, c)
    for lv in reversed(range(len(ch_mult))):
        for i in range(num_res_blocks + 1):
            resblock(f"up.{lv}.block.{i}", c + chans.pop(), ch * ch_mult[lv])
            c = ch * ch_mult[lv]
            if lv in attn_levels:
                attn(f"up.{lv}.attn.{i}", c)
        if lv != 0:
            conv(f"up.{lv}.upsample.conv", c, c, 3)
    norm("norm_out", c)
    conv("conv_out", c, out_ch, 3)
    return shapes


def _random_state_dict(shapes, seed=0):
    rng = np.random.default_rng(seed)
    sd = {}
    for k, s in shapes.items():
        fan_in = int(np.prod(s[1:])) if len(s) > 1 else 1
        scale = 1 / np.sqrt(fan_in) if len(s) > 1 else 0.1
        base = 1.0 if (k.endswith(".weight") and len(s) == 1) else 0.0  # GroupNorm scales near 1
        sd[k] = (base + scale * rng.standard_normal(s)).astype(np.float32)
    return sd


def ddim_reference_forward(sd, x, t, ch, ch_mult, num_res_blocks, attn_levels):
    """ermongroup/ddim Model.forward, written functionally with torch ops over the state dict."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    W = {k: torch.as_tensor(v) for k, v in sd.items()}
    act = lambda h: h * torch.sigmoid(h)  # noqa: E731
    gn = lambda h, n: F.group_norm(h, 32, W[f"{n}.weight"], W[f"{n}.bias"], eps=1e-6)  # noqa: E731
    cv = lambda h, n, pad=1, stride=1: F.conv2d(h, W[f"{n}.weight"], W[f"{n}.bias"], stride, pad)  # noqa: E731
    lin = lambda h, n: F.linear(h, W[f"{n}.weight"], W[f"{n}.bias"])  # noqa: E731

    def res(h, n, temb):
        out = cv(act(gn(h, f"{n}.norm1")), f"{n}.conv1")
        out = out + lin(act(temb), f"{n}.temb_proj")[:, :, None, None]
        out = cv(act(gn(out, f"{n}.norm2")), f"{n}.conv2")
        if f"{n}.nin_shortcut.weight" in W:
            h = cv(h, f"{n}.nin_shortcut", pad=0)
        return h + out

    def attn(h, n):
        b, c, hh, ww = h.shape
        z = gn(h, f"{n}.norm")
        q, k, v = (cv(z, f"{n}.{s}", pad=0).reshape(b, c, hh * ww) for s in "qkv")
        w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * c ** -0.5, dim=2)
        z = torch.einsum("bij,bcj->bci", w, v).reshape(b, c, hh, ww)
        return h + cv(z, f"{n}.proj_out", pad=0)

    with torch.no_grad():
        t = torch.as_tensor(t)
        half = ch // 2
        freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(np.log(10000) / (half - 1)))
        temb = t.float()[:, None] * freqs[None]
        temb = torch.cat([torch.sin(temb), torch.cos(temb)], dim=1)
        temb = lin(act(lin(temb, "temb.dense.0")), "temb.dense.1")
        hs = [cv(torch.as_tensor(x), "conv_in")]
        for lv in range(len(ch_mult)):
            for i in range(num_res_blocks):
                h = res(hs[-1], f"down.{lv}.block.{i}", temb)
                if lv in attn_levels:
                    h = attn(h, f"down.{lv}.attn.{i}")
                hs.append(h)
            if lv != len(ch_mult) - 1:
                hs.append(cv(F.pad(hs[-1], (0, 1, 0, 1)), f"down.{lv}.downsample.conv", pad=0, stride=2))
        h = res(hs[-1], "mid.block_1", temb)
        h = res(attn(h, "mid.attn_1"), "mid.block_2", temb)
        for lv in reversed(range(len(ch_mult))):
            for i in range(num_res_blocks + 1):
                h = res(torch.cat([h, hs.pop()], dim=1), f"up.{lv}.block.{i}", temb)
                if lv in attn_levels:
                    h = attn(h, f"up.{lv}.attn.{i}")
            if lv != 0:
                h = cv(F.interpolate(h, scale_factor=2.0, mode="nearest"), f"up.{lv}.upsample.conv")
        return cv(act(gn(h, "norm_out")), "conv_out").numpy()


CIFAR10_DDIM = dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_levels=(1,))
TINY_DDIM = dict(ch=64, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(1,))  # DDPM: 32 groups, 2+ channels each


def test_ddim_cifar10_keys_and_shapes():
    shapes = ddim_state_dict_shapes(**CIFAR10_DDIM)
    # Spot checks against ermongroup/ddim models/diffusion.py for configs/cifar10.yml.
    assert shapes["temb.dense.0.weight"] == (512, 128)
    assert shapes["down.1.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
    assert shapes["down.1.attn.1.q.weight"] == (256, 256, 1, 1)
    assert shapes["down.2.downsample.conv.weight"] == (256, 256, 3, 3)
    assert "down.3.downsample.conv.weight" not in shapes and "up.0.upsample.conv.weight" not in shapes
    assert shapes["up.0.block.2.conv1.weight"] == (128, 256, 3, 3)
    assert shapes["up.1.block.2.nin_shortcut.weight"] == (256, 384, 1, 1)
    assert shapes["up.1.attn.2.proj_out.weight"] == (256, 256, 1, 1)
    assert shapes["mid.attn_1.norm.weight"] == (256,)
    assert sum(int(np.prod(s)) for s in shapes.values()) == 35_746_307
    spec, params = conv.convert_ddim(_random_state_dict(shapes))
    assert spec.arch == _arch("cifar10")  # dropout 0.1 taken from the matching preset
    assert (spec.image_size, spec.channels, spec.num_classes) == (32, 3, None)
    assert (spec.schedule, spec.prediction_type) == (conv.DDPM_SCHEDULE, "epsilon")
    assert jax.tree_util.tree_map(jnp.shape, params) == jax.tree_util.tree_map(lambda s: s.shape,
                                                                             spec.param_shapes())


@pytest.mark.parametrize("arch,size,batch", [
    pytest.param(TINY_DDIM, 16, 3, id="tiny"),
    pytest.param(CIFAR10_DDIM, 32, 2, id="cifar10", marks=pytest.mark.slow),
])
def test_ddim_parity_with_reference_forward(arch, size, batch):
    pytest.importorskip("torch")
    sd = _random_state_dict(ddim_state_dict_shapes(**arch), seed=3)
    spec, params = conv.convert_ddim(sd, image_size=size)
    assert spec.image_size == size
    rng = np.random.default_rng(4)
    x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    t = np.array([0, 999, 313][:batch])
    ref = ddim_reference_forward(sd, x, t, **arch)
    assert np.abs(ref).max() > 0.5
    np.testing.assert_allclose(_jax_eps(spec, params, x, t), ref, rtol=0, atol=1e-4)


def test_ddim_infers_lsun_and_celeba_architectures():
    for name, mult, size in (("lsun256", (1, 1, 2, 2, 4, 4), 256), ("celeba64", (1, 2, 2, 2, 4), 64)):
        level = int(np.log2(size // 16))
        shapes = ddim_state_dict_shapes(128, mult, 2, (level,))
        sd = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
        spec = conv.ddim_spec(sd)
        assert (spec.build(), spec.image_size) == (UNet(**PRESETS[name]), size)


def test_ddim_module_prefix_and_logvar():
    sd = _random_state_dict(ddim_state_dict_shapes(**TINY_DDIM))
    _, a = conv.convert_ddim(sd)
    _, b = conv.convert_ddim({"module." + k: v for k, v in {**sd, "logvar": np.zeros(1000)}.items()})
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_errors_name_the_key_and_shapes():
    sd = _random_state_dict(ddim_state_dict_shapes(**TINY_DDIM))
    bad = {**sd, "down.0.block.0.conv2.weight": np.zeros((64, 64, 1, 1), np.float32)}
    with pytest.raises(conv.ConversionError,
                       match=r"'down\.0\.block\.0\.conv2\.weight'.*\(64, 64, 1, 1\).*\(64, 64, 3, 3\)"):
        conv.convert_ddim(bad)
    missing = dict(sd)
    del missing["up.1.attn.0.k.bias"]
    with pytest.raises(conv.ConversionError, match=r"missing key 'up\.1\.attn\.0\.k\.bias'.*\(128,\)"):
        conv.convert_ddim(missing)
    with pytest.raises(conv.ConversionError, match=r"unexpected key 'extra\.weight' with shape \(2, 2\)"):
        conv.convert_ddim({**sd, "extra.weight": np.zeros((2, 2))})
    with pytest.raises(conv.ConversionError, match="no attention level"):
        conv.convert_ddim(_random_state_dict(ddim_state_dict_shapes(64, (1, 2), 1, ())))
    nan = {**sd, "up.0.block.1.conv1.bias": np.full((64,), np.nan, np.float32)}
    with pytest.raises(conv.ConversionError, match=r"key 'up\.0\.block\.1\.conv1\.bias' has non-finite values"):
        conv.convert_ddim(nan)
    with pytest.raises(conv.ConversionError, match=r"'conv_out\.weight' has 6 output channels for 3 input"):
        conv.convert_ddim({**sd, "conv_out.weight": np.zeros((6, 64, 3, 3), np.float32),
                           "conv_out.bias": np.zeros(6, np.float32)})


# ----------------------------------------------------------------------------------------------
# Files and the command line


def _write_small_diffusers_dir(path, sd, config, scheduler=None):
    from safetensors.numpy import save_file

    os.makedirs(path)
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, os.path.join(path, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"_class_name": "UNet2DModel", **config}, f)
    if scheduler is not None:
        with open(os.path.join(path, "scheduler_config.json"), "w") as f:
            json.dump(scheduler, f)


def _diffusers_numpy_state_dict(kwargs, params):
    """Our params written out under diffusers key names (the inverse of the converter's mapping)."""
    out = {}
    for path, v in traverse_util.flatten_dict(params).items():
        v = np.asarray(v)
        key = conv.unet2d_key(path, len(kwargs["ch_mult"]))
        if path[-1] == "kernel":
            v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
            if path[-2] == "nin_shortcut":
                v = v[:, :, None, None]
        out[key] = v
    return out


def _assert_params_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _one_line_error(capsys, *needles):
    """stderr of a failed CLI call: one line, starting 'error: ', containing every needle."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def _save_safetensors(path, sd):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path))
    return path


def test_cli_diffusers_safetensors_without_torch(tmp_path, monkeypatch, capsys):
    pytest.importorskip("safetensors")
    kwargs = {**PRESETS["tiny"], "num_classes": 5}
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                                    param_shapes(UNet(**kwargs), 16))
    config = {k: v for k, v in SMALL_DIFFUSERS.items()}
    src = tmp_path / "ddpm"
    sched = {"_class_name": "DDPMScheduler", "beta_start": 0.0002, "beta_end": 0.03, "beta_schedule": "linear",
             "num_train_timesteps": 500}
    _write_small_diffusers_dir(src, _diffusers_numpy_state_dict(kwargs, params), config, sched)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    dst = tmp_path / "out"
    assert conv.main([str(src), str(dst)]) == 0
    spec, loaded = loading.load(dst)
    assert spec.kind == "unet" and spec.arch == _arch("tiny") and spec.num_classes == 5
    assert spec.build() == UNet(**kwargs) and hash(spec.build()) == hash(UNet(**kwargs))
    assert spec.schedule == {"name": "linear", "num_timesteps": 500, "beta_start": 0.0002, "beta_end": 0.03}
    assert (spec.image_size, spec.channels, spec.prediction_type) == (16, 3, "epsilon")
    assert spec.info == {"source": {"path": str(src), "format": "diffusers", "entry": None}}
    _assert_params_equal(loaded, params)
    # The command line reports the parameter count and the spec written.
    out = capsys.readouterr().out.splitlines()
    assert f": {count_params(params):,} params" in out[0] and str(dst) in out[0]
    assert out[1].startswith("spec: ") and json.loads(out[1][len("spec: "):]) == spec.to_dict()
    # A torch-format file now fails with one line naming the missing package.
    (tmp_path / "model.ckpt").write_bytes(b"\0")
    with pytest.raises(ImportError, match="needs the 'torch' package"):
        conv.read_state_dict(tmp_path / "model.ckpt")


def test_cli_ddim_training_checkpoint_uses_ema(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    shapes = ddim_state_dict_shapes(**TINY_DDIM)
    model_sd, ema_sd = _random_state_dict(shapes, seed=1), _random_state_dict(shapes, seed=2)
    states = [{"module." + k: torch.as_tensor(v) for k, v in model_sd.items()}, {"state": {}, "param_groups": []},
              3, 100, {k: torch.as_tensor(v) for k, v in ema_sd.items()}]
    torch.save(states, tmp_path / "ckpt.pth")
    dst = tmp_path / "conv"
    assert conv.main([str(tmp_path / "ckpt.pth"), str(dst), "--image-size", "16"]) == 0
    spec, params = loading.load(dst)
    source = spec.info["source"]
    assert (source["path"], source["format"]) == (str(tmp_path / "ckpt.pth"), "ddim") and "EMA" in source["entry"]
    assert spec.schedule == conv.DDPM_SCHEDULE and spec.prediction_type == "epsilon" and spec.image_size == 16
    assert spec.arch["attn_resolutions"] == (8,)
    _, want = conv.convert_ddim(ema_sd)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=0), params, want)
    # The existing destination is refused, then replaced with --overwrite.
    capsys.readouterr()
    assert conv.main([str(tmp_path / "ckpt.pth"), str(dst)]) == 2
    _one_line_error(capsys, "destination exists", str(dst))
    torch.save({k: torch.as_tensor(v) for k, v in model_sd.items()}, tmp_path / "plain.ckpt")
    assert conv.main([str(tmp_path / "plain.ckpt"), str(dst), "--format", "ddim", "--overwrite"]) == 0
    spec, params = loading.load(dst)
    assert (spec.image_size, spec.arch["attn_resolutions"]) == (32, (16,))  # 16 px at the attention level
    assert spec.info["source"]["entry"] is None
    _, want = conv.convert_ddim(model_sd)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=0), params, want)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pth", "conv", "plain.ckpt"]  # nothing left beside it


def test_overwrite_through_a_symlink_replaces_its_model_and_leaves_nothing_behind(tmp_path):
    kwargs = {**PRESETS["tiny"], "num_classes": 5}
    params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), param_shapes(UNet(**kwargs), 16))
    _write_small_diffusers_dir(tmp_path / "src", _diffusers_numpy_state_dict(kwargs, params), SMALL_DIFFUSERS)
    (tmp_path / "disk").mkdir()
    (tmp_path / "models").mkdir()
    assert conv.main([str(tmp_path / "src"), str(tmp_path / "disk" / "model")]) == 0
    link = tmp_path / "models" / "model"
    link.symlink_to(tmp_path / "disk" / "model")
    assert conv.main([str(tmp_path / "src"), str(link), "--overwrite"]) == 0
    assert link.is_symlink() and loading.load(link)[0].info["source"]["path"] == str(tmp_path / "src")
    assert os.listdir(tmp_path / "models") == ["model"] and os.listdir(tmp_path / "disk") == ["model"]
    for name in os.listdir(link):
        assert os.stat(link / name).st_mode & 0o777 == 0o666 & ~_umask(), name


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_overwrite_refuses_a_foreign_directory_and_unknown_formats(tmp_path, capsys):
    pytest.importorskip("torch")
    import torch

    sd = _random_state_dict(ddim_state_dict_shapes(**TINY_DDIM))
    torch.save({k: torch.as_tensor(v) for k, v in sd.items()}, tmp_path / "m.pth")
    other = tmp_path / "mydata"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    assert conv.main([str(tmp_path / "m.pth"), str(other), "--overwrite"]) == 2
    _one_line_error(capsys, "not a model directory", str(other))
    assert (other / "keep.txt").exists()
    # The old converted layout (config.json + orbax params/) is not replaced either.
    old = tmp_path / "old"
    (old / "params").mkdir(parents=True)
    (old / "config.json").write_text("{}")
    assert conv.main([str(tmp_path / "m.pth"), str(old), "--overwrite"]) == 2
    _one_line_error(capsys, "not a model directory", str(old))
    assert (old / "config.json").exists()
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "odd.pth")
    assert conv.main([str(tmp_path / "odd.pth"), str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "unrecognised checkpoint format")
    with pytest.raises(SystemExit):
        conv.main([str(tmp_path / "m.pth"), str(tmp_path / "o"), "--format", "onnx"])


def test_failed_conversion_keeps_the_old_destination(tmp_path, monkeypatch, capsys):
    shapes = ddim_state_dict_shapes(**TINY_DDIM)
    good = _random_state_dict(shapes, seed=1)
    dst = tmp_path / "model"
    conv.convert(_save_safetensors(tmp_path / "good.safetensors", good), dst, image_size=16)
    old_spec, old_params = loading.load(dst)
    listing = sorted(os.listdir(tmp_path))

    def old_destination_intact():
        spec, params = loading.load(dst)
        assert spec == old_spec and spec.info == old_spec.info
        _assert_params_equal(params, old_params)
        assert sorted(os.listdir(tmp_path)) == listing  # and no temporary directory left beside it

    # Bad weights, found while converting: non-finite values, a wrong shape, a missing key, unreadable bytes.
    nan = {**good, "conv_in.bias": np.full((64,), np.nan, np.float32)}
    wrong = {**good, "conv_out.weight": np.zeros((3, 32, 1, 1), np.float32)}
    missing = {k: v for k, v in good.items() if k != "mid.attn_1.q.bias"}
    for name, sd, needle in (("nan", nan, "non-finite"), ("wrong", wrong, "shape mismatch"),
                             ("missing", missing, "missing key")):
        path = _save_safetensors(tmp_path / f"{name}.safetensors", sd)
        listing = sorted(os.listdir(tmp_path))
        assert conv.main([str(path), str(dst), "--overwrite", "--image-size", "16"]) == 2
        _one_line_error(capsys, needle)
        old_destination_intact()
    (tmp_path / "junk.safetensors").write_bytes(os.urandom(64))
    listing = sorted(os.listdir(tmp_path))
    assert conv.main([str(tmp_path / "junk.safetensors"), str(dst), "--overwrite"]) == 2
    _one_line_error(capsys, str(tmp_path / "junk.safetensors"))
    old_destination_intact()

    # A failure while the new model directory is being written (the disk fills up).
    import safetensors.numpy

    other = _save_safetensors(tmp_path / "other.safetensors", _random_state_dict(shapes, seed=2))
    listing = sorted(os.listdir(tmp_path))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(safetensors.numpy, "save_file", disk_full)
        assert conv.main([str(other), str(dst), "--overwrite", "--image-size", "16"]) == 2
    _one_line_error(capsys, "No space left on device")
    old_destination_intact()

    # A conversion that succeeds replaces it, and leaves nothing else behind.
    spec = conv.convert(other, dst, overwrite=True, image_size=16)
    new_spec, new_params = loading.load(dst)
    assert new_spec.info["source"]["path"] == str(other) and new_spec == spec == old_spec
    _assert_params_equal(new_params, conv.convert_ddim(_random_state_dict(shapes, seed=2), 16)[1])
    assert sorted(os.listdir(tmp_path)) == listing


def test_cli_unreadable_weights_file_is_one_line_error(tmp_path, capsys):
    rng = np.random.default_rng(0)
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(rng.bytes(4096))
    assert conv.main([str(bad), str(tmp_path / "out")]) == 2
    _one_line_error(capsys, f"cannot read {bad} as a safetensors file")
    with pytest.raises(conv.ConversionError, match=r"x\.safetensors"):
        conv.read_state_dict(bad)
    # Header that is valid JSON in a truncated file, and an empty file.
    bad.write_bytes(np.uint64(100).tobytes() + b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}')
    assert conv.main([str(bad), str(tmp_path / "out")]) == 2
    _one_line_error(capsys, str(bad))
    bad.write_bytes(b"")
    assert conv.main([str(bad), str(tmp_path / "out"), "--format", "ddim"]) == 2
    _one_line_error(capsys, str(bad))
    # A torch file of random bytes: torch's several-line message is folded into one line.
    pytest.importorskip("torch")
    (tmp_path / "x.bin").write_bytes(rng.bytes(4096))
    assert conv.main([str(tmp_path / "x.bin"), str(tmp_path / "out")]) == 2
    _one_line_error(capsys, f"cannot read {tmp_path / 'x.bin'} with torch.load")
    assert not (tmp_path / "out").exists()


SD_UNET_CONFIG = {"_class_name": "UNet2DConditionModel", "block_out_channels": [32, 64], "layers_per_block": 1,
                  "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "attention_head_dim": 2,
                  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 16,
                  "norm_num_groups": 8, "sample_size": 8}
SD_VAE_CONFIG = {"_class_name": "AutoencoderKL", "block_out_channels": [16, 32], "layers_per_block": 1,
                 "latent_channels": 4, "norm_num_groups": 8, "sample_size": 16, "scaling_factor": 0.3}


def _folder_with_empty_weights(root, config_file, key, value):
    """A diffusers UNet2DModel folder (config_file 'config.json' or 'scheduler_config.json') or a Stable
    Diffusion folder ('unet/', 'vae/' or 'scheduler/' + file) with ``key=value`` in that config. Its weights
    files are empty: a conversion reads them only once every config value has been checked."""
    configs = {"config.json": {"_class_name": "UNet2DModel", **SMALL_DIFFUSERS},
               "scheduler_config.json": {"_class_name": "DDPMScheduler"}}
    if "/" in config_file:
        configs = {"unet/config.json": SD_UNET_CONFIG, "vae/config.json": SD_VAE_CONFIG,
                   "scheduler/scheduler_config.json": {"_class_name": "DDIMScheduler"}}
    configs[config_file] = {**configs[config_file], key: value}
    for name, config in configs.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config))
        if name.endswith("/config.json") or name == "config.json":
            (path.parent / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    return root


@pytest.mark.parametrize("config_file,key,value", [
    ("config.json", "block_out_channels", []), ("config.json", "block_out_channels", ["a"]),
    ("config.json", "block_out_channels", [0, 0]), ("config.json", "norm_eps", "x"), ("config.json", "dropout", "x"),
    ("config.json", "sample_size", -3), ("config.json", "sample_size", "x"), ("config.json", "layers_per_block", -1),
    ("config.json", "down_block_types", 5), ("config.json", "attention_head_dim", 0),
    ("scheduler_config.json", "beta_end", "x"), ("scheduler_config.json", "trained_betas", 5),
    ("scheduler_config.json", "num_train_timesteps", 1e12), ("scheduler_config.json", "num_train_timesteps", 10**12),
    ("config.json", "--image-size", -5), ("config.json", "--image-size", 0),
    ("unet/config.json", "block_out_channels", []), ("unet/config.json", "norm_eps", "x"),
    ("unet/config.json", "attention_head_dim", 0), ("unet/config.json", "layers_per_block", -1),
    ("unet/config.json", "down_block_types", 5), ("vae/config.json", "sample_size", -16),
    ("vae/config.json", "sample_size", "x"), ("vae/config.json", "scaling_factor", "x"),
    ("vae/config.json", "block_out_channels", ["a"]), ("scheduler/scheduler_config.json", "beta_end", "x"),
    ("scheduler/scheduler_config.json", "num_train_timesteps", 10**12),
])
def test_a_bad_config_value_is_one_line_naming_the_file_field_and_what_is_allowed(tmp_path, capsys, config_file,
                                                                                  key, value):
    cli = key.startswith("--")
    src = _folder_with_empty_weights(tmp_path / "src", config_file, "sample_size" if cli else key,
                                     SMALL_DIFFUSERS["sample_size"] if cli else value)
    assert conv.main([str(src), str(tmp_path / "out")] + ([key, str(value)] if cli else [])) == 2
    if cli:
        _one_line_error(capsys, f"{key}={value}", "must be a positive integer")
    else:
        assert _one_line_error(capsys, f"{key}=", "must be").count(str(src / config_file)) == 1
    assert sorted(os.listdir(tmp_path)) == ["src"]
    # The same folder with the value as it was gets past every config check (and fails at the empty weights).
    good = _folder_with_empty_weights(tmp_path / "good", config_file, "_unused", None)
    assert conv.main([str(good), str(tmp_path / "out")]) == 2
    _one_line_error(capsys, "cannot read", ".safetensors")


def test_a_stable_diffusion_folder_without_its_vae_says_what_is_missing(tmp_path, capsys):
    src = _folder_with_empty_weights(tmp_path / "sd", "unet/config.json", "_unused", None)
    for f in (src / "vae").iterdir():
        f.unlink()
    (src / "vae").rmdir()
    for fmt in ("auto", "stable_diffusion"):
        assert conv.main([str(src), str(tmp_path / "out"), "--format", fmt]) == 2
        _one_line_error(capsys, str(src), "unet/", "no vae/config.json")
    assert not (tmp_path / "out").exists()


def test_diffusers_scheduler_names_and_prediction_types_are_translated():
    assert set(conv.DIFFUSERS_SCHEDULES.values()) <= set(SCHEDULES)
    assert set(conv.DIFFUSERS_PREDICTION_TYPES.values()) <= set(PREDICTION_TYPES)
    assert conv.diffusers_schedule(None) == (conv.DDPM_SCHEDULE, "epsilon")
    for theirs, ours in (("epsilon", "epsilon"), ("v_prediction", "v"), ("sample", "x0")):
        assert conv.diffusers_schedule({"prediction_type": theirs})[1] == ours
    assert conv.diffusers_schedule({"beta_schedule": "squaredcos_cap_v2", "beta_start": 0.1})[0] == {
        "name": "cosine", "num_timesteps": 1000}
    assert conv.diffusers_schedule({"beta_schedule": "sigmoid", "rescale_betas_zero_snr": True,
                                    "num_train_timesteps": 10})[0] == {
        "name": "sigmoid", "num_timesteps": 10, "beta_start": 0.0001, "beta_end": 0.02,
        "rescale_zero_terminal_snr": True}
    assert conv.diffusers_schedule({"trained_betas": [0.1, 0.2], "beta_schedule": "laplace"})[0] == {
        "name": "custom", "betas": [0.1, 0.2]}
    with pytest.raises(conv.ConversionError, match=r"^sched\.json: beta_schedule='laplace' is not supported; "
                                                   r"allowed: linear, scaled_linear, squaredcos_cap_v2, sigmoid"):
        conv.diffusers_schedule({"beta_schedule": "laplace"}, "sched.json")
    with pytest.raises(conv.ConversionError, match=r"prediction_type='flow_prediction' is not supported; "
                                                   r"allowed: epsilon, v_prediction, sample"):
        conv.diffusers_schedule({"prediction_type": "flow_prediction"})
    with pytest.raises(conv.ConversionError, match="trained_betas has 2 values but num_train_timesteps=1000"):
        conv.diffusers_schedule({"trained_betas": [0.1, 0.2], "num_train_timesteps": 1000})
    with pytest.raises(conv.ConversionError, match=r"^s\.json: beta_start and beta_end must satisfy"):
        conv.diffusers_schedule({"beta_end": 2.0}, "s.json")


def test_cli_pipeline_scheduler_config_sets_schedule_and_prediction(tmp_path, capsys):
    kwargs = PRESETS["tiny"]
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                                    param_shapes(UNet(**kwargs), 16))
    sd = _diffusers_numpy_state_dict(kwargs, params)
    config = {k: v for k, v in SMALL_DIFFUSERS.items() if k != "num_class_embeds"}
    src = tmp_path / "pipeline"
    _write_small_diffusers_dir(src / "unet", sd, config)
    (src / "scheduler").mkdir()
    sched_path = src / "scheduler" / "scheduler_config.json"
    sched_path.write_text(json.dumps({"_class_name": "DDIMScheduler", "beta_schedule": "squaredcos_cap_v2",
                                      "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                                      "num_train_timesteps": 1000, "timestep_spacing": "trailing"}))
    spec = conv.convert(src, tmp_path / "v")
    assert loading.load(tmp_path / "v")[0] == spec
    assert spec.schedule == {"name": "cosine", "num_timesteps": 1000, "rescale_zero_terminal_snr": True}
    assert spec.prediction_type == "v" and spec.make_schedule().zero_terminal_snr
    # trained_betas: a custom schedule, printed abbreviated.
    betas = [float(b) for b in np.linspace(1e-3, 0.05, 300)]
    sched_path.write_text(json.dumps({"trained_betas": betas, "prediction_type": "sample"}))
    capsys.readouterr()
    assert conv.main([str(src), str(tmp_path / "custom")]) == 0
    assert '"betas": "<300 values>"' in capsys.readouterr().out
    spec, _ = loading.load(tmp_path / "custom")
    assert spec.schedule == {"name": "custom", "betas": tuple(betas)} and spec.prediction_type == "x0"
    np.testing.assert_allclose(spec.make_schedule().betas, np.float32(betas))
    # An unsupported scheduler fails before the weights are read, naming the file and what is allowed.
    sched_path.write_text(json.dumps({"beta_schedule": "laplace"}))
    (src / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not read")
    assert conv.main([str(src), str(tmp_path / "laplace")]) == 2
    _one_line_error(capsys, str(sched_path), "beta_schedule='laplace'", "allowed: linear, scaled_linear")
    sched_path.write_text(json.dumps({"prediction_type": "flow"}))
    assert conv.main([str(src), str(tmp_path / "flow")]) == 2
    _one_line_error(capsys, str(sched_path), "prediction_type='flow'", "allowed: epsilon, v_prediction, sample")
    assert not (tmp_path / "laplace").exists() and not (tmp_path / "flow").exists()


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_cli_diffusers_save_pretrained(tmp_path, safe):
    model = _diffusers_model(SMALL_DIFFUSERS, seed=6)
    model.save_pretrained(tmp_path / "unet", safe_serialization=safe)
    assert (tmp_path / "unet" / ("diffusion_pytorch_model." + ("safetensors" if safe else "bin"))).exists()
    assert conv.main([str(tmp_path), str(tmp_path / "out")]) == 0  # pipeline layout: SRC/unet/
    spec, params = loading.load(tmp_path / "out")
    assert spec.schedule == conv.DDPM_SCHEDULE  # no scheduler_config.json: DDPM's defaults
    want_spec, want = conv.convert_diffusers(model.state_dict(), dict(model.config))
    assert spec == want_spec
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=0), params, want)
    # The loaded model drives the sampler's eps_fn and reproduces diffusers.
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    t, y = np.array([3, 700]), np.array([1, 4])
    eps_fn = spec.eps_fn(params, jnp.asarray(y, jnp.int32))
    out = _call_eps(eps_fn, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t, jnp.int32))
    np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), _diffusers_eps(model, x, t, y),
                               rtol=0, atol=1e-4)
