"""Tests of the Flax UNet: parameter counts, shapes, conditioning, dropout, dtypes and make_eps_fn."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from helpers import random_params

from ddim_jax.unet import (PRESET_IMAGE_SIZE, PRESETS, UNet, count_params, init_params, make_eps_fn,
                           param_shapes, timestep_embedding)

TINY = PRESETS["tiny"]


def _random_params(model, image_size=16, seed=0, scale=0.1):
    """Gaussian params of the model's shapes (cheaper than model.init, and no zero-initialised layers)."""
    rng = np.random.default_rng(seed)
    # Drawn in float32 on the host and copied over in one device_put (jnp.asarray compiles a program a shape).
    return jax.device_put(jax.tree_util.tree_map(lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32),
                                                 param_shapes(model, image_size)))


@functools.lru_cache(maxsize=None)
def _jitted_apply(model, kw_items):
    kw = dict(kw_items)
    return jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y, **kw))


def _apply(model, params, x, t, y=None, **kw):
    """Jitted ``model.apply`` (eager Flax is slow on CPU): one jitted function per (equal) model and options,
    so tests that run the same network on the same shapes trace and compile it once."""
    return _jitted_apply(model, tuple(sorted(kw.items())))(params, x, t, y)


@pytest.fixture(scope="module")
def tiny_params():
    return _random_params(UNet(**TINY))


def test_cifar10_param_count_is_ddpm_35_7m():
    assert count_params(param_shapes(UNet(**PRESETS["cifar10"]), 32)) == 35_746_307


# One level, no attention but the middle block's: the tiny preset's blocks at about half its compile time.
SMALL = {**TINY, "ch_mult": (1,), "attn_resolutions": ()}


def test_init_params_uses_ddpm_init():
    model = UNet(**SMALL)
    params = jax.tree_util.tree_map(np.asarray, init_params(model, jax.random.PRNGKey(0), 8))  # checked on the host
    assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), params) == jax.tree_util.tree_map(
        lambda s: (s.shape, s.dtype), param_shapes(model, 8))
    # DDPM zero-initialises (scale 1e-10) the last conv of each block, attention outputs and conv_out.
    assert float(np.abs(params["conv_out"]["kernel"]).max()) < 1e-5
    assert float(np.abs(params["mid_attn_1"]["proj_out"]["kernel"]).max()) < 1e-5
    assert float(np.abs(params["down_0_block_0"]["conv2"]["kernel"]).max()) < 1e-5
    assert 0.01 < float(np.abs(params["conv_in"]["kernel"]).max()) < 1.0
    assert float(np.abs(params["conv_in"]["bias"]).max()) == 0.0


@pytest.mark.parametrize("name", ["cifar10", "celeba64", "lsun256", "tiny"])
def test_preset_output_shape_and_attention_level(name):
    model, size = UNet(**PRESETS[name]), PRESET_IMAGE_SIZE[name]
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.int32)
    params = param_shapes(model, size)
    out = jax.eval_shape(lambda p, x, t: model.apply({"params": p}, x, t), params, x, t)
    assert out.shape == (2, size, size, 3) and out.dtype == jnp.float32
    # Attention sits at the level whose feature map is 16 px (8 px for 'tiny'), plus the middle block.
    attn_px = PRESETS[name]["attn_resolutions"][0]
    level = int(math.log2(size // attn_px))
    attn = sorted({k for k in params if "_attn_" in k})
    expected = sorted([f"down_{level}_attn_{i}" for i in range(PRESETS[name]["num_res_blocks"])]
                      + [f"up_{level}_attn_{i}" for i in range(PRESETS[name]["num_res_blocks"] + 1)]
                      + ["mid_attn_1"])
    assert attn == expected


# The UNet2DModel configurations of the published DDPM checkpoints (their config.json on the Hugging Face
# Hub), the independent truth for the presets: google/ddpm-cifar10-32, and google/ddpm-church-256,
# ddpm-bedroom-256, ddpm-celebahq-256 and ddpm-cat-256, which share one 256x256 architecture.
_DDPM_DIFFUSERS_COMMON = dict(in_channels=3, out_channels=3, layers_per_block=2, attention_head_dim=None,
                              downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
                              norm_num_groups=32, act_fn="silu", center_input_sample=False, mid_block_scale_factor=1,
                              time_embedding_type="positional")
PUBLISHED_DDPM = {
    "cifar10": dict(_DDPM_DIFFUSERS_COMMON, sample_size=32, block_out_channels=(128, 256, 256, 256),
                    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    "lsun256": dict(_DDPM_DIFFUSERS_COMMON, sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512),
                    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D",
                                      "DownBlock2D"),
                    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D")),
    # No diffusers checkpoint is published for CelebA 64x64: this is ermongroup/ddim's configs/celeba.yml
    # (ch 128, ch_mult [1, 2, 2, 2, 4], 2 res blocks, attention at 16 px) written as a UNet2DModel.
    "celeba64": dict(_DDPM_DIFFUSERS_COMMON, sample_size=64, block_out_channels=(128, 256, 256, 256, 512),
                     down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_DDPM))
def test_presets_match_the_published_ddpm_networks(name):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    config = PUBLISHED_DDPM[name]
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        ref = diffusers.UNet2DModel(**config)
    size = config["sample_size"]
    assert PRESET_IMAGE_SIZE[name] == size
    levels = len(config["block_out_channels"])
    ref_down = [lv for lv, b in enumerate(ref.down_blocks) if getattr(b, "attentions", None)]
    ref_up = [levels - 1 - i for i, b in enumerate(ref.up_blocks) if getattr(b, "attentions", None)]
    assert ref_down == ref_up
    assert PRESETS[name]["attn_resolutions"] == tuple(size // 2 ** lv for lv in ref_down)
    # The UNet's default fields are the CIFAR-10 network.
    for model in [UNet(**PRESETS[name])] + ([UNet()] if name == "cifar10" else []):
        ours = param_shapes(model, size)
        assert count_params(ours) == sum(p.numel() for p in ref.parameters())
        # Attention at the same levels (the up path's blocks are numbered from the bottom in diffusers).
        assert sorted({int(k.split("_")[1]) for k in ours if k.startswith("down_") and "_attn_" in k}) == ref_down
        assert sorted({int(k.split("_")[1]) for k in ours if k.startswith("up_") and "_attn_" in k}) == ref_down


def test_timestep_embedding_formula():
    t = jnp.array([0, 7, 999], jnp.int32)
    emb = np.asarray(jax.jit(timestep_embedding, static_argnums=1)(t, 8))  # one program, not one an op
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 3)
    want = np.concatenate([np.sin(np.outer([0, 7, 999], freqs)), np.cos(np.outer([0, 7, 999], freqs))], 1)
    np.testing.assert_allclose(emb, want, atol=1e-5)


def test_tiny_forward_depends_on_x_and_t(tiny_params):
    model = UNet(**TINY)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))

    def apply(x, t):  # the outputs are compared on the host (eager jax ops would compile a program each)
        return np.asarray(_apply(model, tiny_params, x, t))

    out = apply(x, jnp.array([0, 999], jnp.int32))
    assert out.shape == x.shape and bool(np.all(np.isfinite(out)))
    out_same_t = apply(x, jnp.array([999, 999], jnp.int32))
    assert float(np.abs(out[1] - out_same_t[1]).max()) < 1e-6  # samples are independent
    assert float(np.abs(out[0] - out_same_t[0]).max()) > 1e-3  # t matters
    flipped = jnp.asarray(np.asarray(x)[::-1])
    assert float(np.abs(apply(flipped, jnp.array([999, 999], jnp.int32))[0] - out_same_t[1]).max()) < 1e-6
    # A scalar t is broadcast over the batch.
    np.testing.assert_allclose(apply(x, jnp.int32(999)), out_same_t, atol=1e-6)


def test_groups_of_one_channel_hide_the_timestep():
    """The blocks add the timestep embedding as a per-channel shift; GroupNorm with one channel per group
    subtracts it again, so such a network cannot see t (why configs with ch = 32 use norm_groups = 8)."""
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 8, 8, 1))
    for groups, sees_t in ((32, False), (8, True)):
        model = UNet(**{**TINY, "out_ch": 1, "ch_mult": (1,), "attn_resolutions": (), "norm_groups": groups})
        params = random_params(param_shapes(model, 8, channels=1))  # none zero, unlike some initial values
        apply = jax.jit(model.apply)
        out = [np.asarray(apply({"params": params}, x, jnp.array([t]))) for t in (0, 500, 999)]
        change = max(float(np.abs(o - out[0]).max()) for o in out[1:])
        assert (change > 1e-2) if sees_t else (change < 1e-4), (groups, change)


def test_other_image_sizes_and_out_channels():
    model = UNet(**{**TINY, "out_ch": 6})
    params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), param_shapes(model, 8, channels=1))
    out = _apply(model, params, jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32))
    assert out.shape == (1, 8, 8, 6)
    with pytest.raises(ValueError, match="divisible by 2"):
        model.apply({"params": params}, jnp.zeros((1, 9, 9, 1)), jnp.zeros((1,), jnp.int32))


def test_class_conditioning():
    model = UNet(**{**TINY, "num_classes": 10})
    params = _random_params(model)
    assert params["class_embed"]["embedding"].shape == (10, 4 * TINY["ch"])
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
    t = jnp.array([10, 10], jnp.int32)
    a = np.asarray(_apply(model, params, x, t, jnp.array([1, 1], jnp.int32)))
    b = np.asarray(_apply(model, params, x, t, jnp.array([1, 2], jnp.int32)))
    assert float(np.abs(a[0] - b[0]).max()) < 1e-6 and float(np.abs(a[1] - b[1]).max()) > 1e-3
    with pytest.raises(ValueError, match="y .* required"):
        jax.eval_shape(lambda p: model.apply({"params": p}, x, t), params)
    with pytest.raises(ValueError, match="num_classes=None"):
        jax.eval_shape(lambda p: UNet(**TINY).apply({"params": p}, x, t, jnp.array([1, 2], jnp.int32)),
                       param_shapes(UNet(**TINY), 16))


def test_dropout_only_when_training():
    model = UNet(**{**SMALL, "dropout": 0.5})
    params = _random_params(model, image_size=8)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (1, 8, 8, 3)))
    t = np.array([3], np.int32)
    eval_a = np.asarray(_apply(model, params, x, t))
    eval_b = np.asarray(_apply(model, params, x, t, train=False))
    np.testing.assert_array_equal(eval_a, eval_b)
    train = jax.jit(lambda p, k: model.apply({"params": p}, x, t, train=True, rngs={"dropout": k}))
    tr_a, tr_b = np.asarray(train(params, jax.random.PRNGKey(1))), np.asarray(train(params, jax.random.PRNGKey(2)))
    assert float(np.abs(tr_a - tr_b).max()) > 1e-3 and float(np.abs(tr_a - eval_a).max()) > 1e-3
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(lambda p: model.apply({"params": p}, x, t, train=True), params)


def test_bfloat16_compute_keeps_float32_params(tiny_params):
    model16 = UNet(**{**TINY, "dtype": jnp.bfloat16})
    shapes = param_shapes(model16, 16)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype(jnp.float32)}
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
    t = jnp.array([5, 900], jnp.int32)
    ref = np.asarray(_apply(UNet(**TINY), tiny_params, x, t))
    out = np.asarray(_apply(model16, tiny_params, x, t))
    assert out.dtype == np.float32
    rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    assert 0 < rel < 0.05


def test_param_names_follow_the_reference_layout(tiny_params):
    names = set(traverse_util.flatten_dict(tiny_params, sep="/"))
    for name in ["conv_in/kernel", "temb_dense_0/kernel", "temb_dense_1/bias", "down_0_block_0/conv1/kernel",
                 "down_0_downsample/conv/kernel", "down_1_block_0/nin_shortcut/kernel", "down_1_attn_0/q/kernel",
                 "mid_block_1/temb_proj/kernel", "mid_attn_1/proj_out/bias", "up_1_block_1/norm2/scale",
                 "up_1_upsample/conv/kernel", "up_0_block_0/nin_shortcut/kernel", "norm_out/scale",
                 "conv_out/kernel"]:
        assert name in names, name


def test_make_eps_fn_traces_once_across_calls(tiny_params):
    traces = []

    @jax.jit
    def run(eps_fn, x, t):
        traces.append(1)
        return eps_fn(x, t)

    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
    t = jnp.array([1, 500], jnp.int32)
    other = _random_params(UNet(**TINY), seed=5)
    out1 = run(make_eps_fn(UNet(**TINY), tiny_params), x, t)
    out2 = run(make_eps_fn(UNet(**TINY), other), x, t)  # a separately built, equal model
    assert len(traces) == 1
    np.testing.assert_allclose(out1, _apply(UNet(**TINY), tiny_params, x, t), atol=1e-5)
    np.testing.assert_allclose(out2, _apply(UNet(**TINY), other, x, t), atol=1e-5)
    # Params travel as leaves, not as constants baked into the program.
    assert len(jax.tree_util.tree_leaves(make_eps_fn(UNet(**TINY), tiny_params))) == len(
        jax.tree_util.tree_leaves(tiny_params))
    # A different model is a different treedef.
    run(make_eps_fn(UNet(**{**TINY, "dropout": 0.3}), tiny_params), x, t)
    assert len(traces) == 2


def test_make_eps_fn_with_labels_traces_once():
    model = UNet(**{**TINY, "num_classes": 4})
    params = _random_params(model)
    traces = []

    @jax.jit
    def run(eps_fn, x, t):
        traces.append(1)
        return eps_fn(x, t)

    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
    t = jnp.array([1, 500], jnp.int32)
    a = np.asarray(run(make_eps_fn(model, params, jnp.array([0, 1], jnp.int32)), x, t))
    b = np.asarray(run(make_eps_fn(model, params, jnp.array([3, 1], jnp.int32)), x, t))
    assert len(traces) == 1
    assert float(np.abs(a[0] - b[0]).max()) > 1e-3 and float(np.abs(a[1] - b[1]).max()) < 1e-6
