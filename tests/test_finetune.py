"""Fine-tuning (``training.init_from``) and LoRA training (``training.lora``): a run starts from a model
directory's params exactly, takes its architecture (a disagreeing config is refused by field) and, for a latent
model, its autoencoder; it resumes without reading the directory again. A LoRA run's step 0 is the base model,
only its adapters train and are checkpointed, and its LoRA file (diffusers' format) gives diffusers' UNet the
output of our merged model and merges back to the same params through ``ddim_jax.lora``."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import traverse_util
from helpers import leaves, tiny_config

from ddim_jax import cond_unet, convert, lora, models, training
from ddim_jax.config import base_config, spec_from_config
from ddim_jax.models import ModelSpec, params_digest
from ddim_jax.parallel import make_mesh
from ddim_jax.training import adapters
from ddim_jax.training.run import resolve

STEPS = dict(batch_size=8, warmup_steps=2, log_every=2, checkpoint_every=2, keep_checkpoints=2, sample_every=0)


def ft_config(init_from, **training):
    """A run from ``init_from`` with the model, data and diffusion blocks left at their defaults."""
    c = base_config()
    c.training.update(dict(STEPS, num_steps=2, init_from=str(init_from)), **training)
    return c


def _random(shapes, seed: int):
    """Random params of these shapes (drawn on the host: nothing to compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def _equal(a, b):
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A model directory: the tiny UNet (with its middle attention) at random weights, on a linear schedule."""
    root = tmp_path_factory.mktemp("finetune")
    c = tiny_config()
    c.diffusion.schedule = "linear"
    spec = spec_from_config(c)
    params = _random(spec.param_shapes(), 0)
    models.save(str(root / "src"), spec, params)
    return root, spec, params


def train(config, workdir):
    return training.train(config, str(workdir), progress=False, devices=jax.devices()[:1])


def test_init_from_starts_at_the_model_and_resumes_without_reading_it(source):
    root, spec, params = source
    src = root / "src"
    run = resolve(ft_config(src), num_devices=1)
    assert run.spec.architecture() == spec.architecture() and run.spec.schedule == spec.schedule
    assert run.config.model.attn_resolutions == () and run.config.diffusion.num_timesteps == 100  # filled
    assert run.record.init_sha256 == params_digest(params) and run.record.init_from == str(src)
    state = training.init_state(run, make_mesh(jax.devices()[:1]))
    _equal(state.params, params)  # exactly the directory's, and the EMA's too
    _equal(state.ema_params, params)

    full = train(ft_config(src), root / "full")
    train(ft_config(src, num_steps=1), root / "split")  # stopped after one step (its final checkpoint)
    assert json.loads((root / "split" / "run.json").read_text())["init_sha256"] == params_digest(params)
    moved = root / "src_moved"
    shutil.move(str(src), moved)  # a resume does not read init_from again
    try:
        rest = train(ft_config(src), root / "split")
    finally:
        shutil.move(str(moved), src)
    assert rest.steps_run == 1
    _equal((full.state.params, full.state.ema_params), (rest.state.params, rest.state.ema_params))
    assert not np.array_equal(leaves(full.state.params)[0], leaves(params)[0])  # it trained
    # A training workdir as init_from: its exported EMA model.
    again = resolve(ft_config(root / "full"), num_devices=1)
    _equal(again.init_params, full.state.ema_params)
    assert again.spec.architecture() == spec.architecture()


def test_a_config_that_disagrees_with_the_model_is_refused_by_field(source, tmp_path):
    root, spec, params = source
    c = ft_config(root / "src")
    c.model.ch = 64
    with pytest.raises(ValueError, match=r"^model\.ch is 64 but the init model \(.*\) has 32"):
        train(c, tmp_path / "w")
    c = ft_config(root / "src")
    c.diffusion.prediction_type = "v"
    with pytest.raises(ValueError, match=r"^diffusion\.prediction_type is 'v' but the init model"):
        train(c, tmp_path / "w")
    c = ft_config(root / "src")
    c.model.kind = "cross_attention_unet"
    with pytest.raises(ValueError, match=r"^model\.kind is 'cross_attention_unet' but the init model"):
        train(c, tmp_path / "w")
    assert not (tmp_path / "w").exists()
    # Fields set to the model's own values are accepted.
    c = ft_config(root / "src")
    c.model.ch, c.diffusion.num_timesteps = 32, 100
    assert resolve(c).spec.architecture() == spec.architecture()


def test_a_latent_init_from_uses_the_directory_autoencoder(tmp_path):
    ae = ModelSpec("autoencoder_kl", {"block_out_channels": (8, 8), "layers_per_block": 1, "latent_channels": 2,
                                      "norm_groups": 4}, 8, 1, None, None)
    spec = dataclasses.replace(spec_from_config(tiny_config()), image_size=4, channels=2, autoencoder=ae,
                               scale_factor=0.5)
    params = _random(spec.param_shapes(), 1)
    models.save(str(tmp_path / "latent"), spec, params)
    run = resolve(ft_config(tmp_path / "latent"), str(tmp_path / "w"))
    assert run.spec.autoencoder == ae and run.spec.scale_factor == 0.5 and run.config.data.image_size == 8
    assert run.record.autoencoder_sha256 == params_digest(params["autoencoder"]) and run.record.scale_factor == 0.5
    _equal(run.frozen["autoencoder"], params["autoencoder"])
    assert "init model's autoencoder" in run.first_stage.source and str(tmp_path / "latent") in run.first_stage.source
    _equal(run.init_params, params["denoiser"])  # what init_state starts from (checked above for a pixel model)
    assert not (tmp_path / "w").exists()


LORA = dict(rank=2, alpha=4.0, targets=("attention", "conv3x3"))


@pytest.fixture(scope="module")
def lora_run(source):
    root, spec, params = source
    c = ft_config(root / "src", num_steps=2)
    c.training.lora.update(LORA)
    result = train(c, root / "lora")
    return root / "lora", c, result


def test_lora_step_0_is_the_base_model(source):
    root, spec, params = source
    c = ft_config(root / "src")
    c.training.lora.update(LORA)
    run = resolve(c)
    state = training.init_state(run, make_mesh(jax.devices()[:1]))
    flat = {p: np.asarray(v) for p, v in traverse_util.flatten_dict(state.params).items()}  # checked on the host
    ups = [v for p, v in flat.items() if p[-1] == "up"]
    downs = [v for p, v in flat.items() if p[-1] == "down"]
    assert ups and all(not np.any(u) for u in ups) and all(np.any(d) for d in downs)
    merged = jax.jit(run.objective.model_params)(state.params, run.frozen)  # one program, not one per kernel
    _equal(merged, params)
    apply = jax.jit(lambda p, x, t: spec.build().apply({"params": p}, x, t))
    x, t = np.asarray(jax.random.normal(jax.random.key(3), (2, 8, 8, 1))), np.array([3, 70], np.int32)
    # Both param trees placed alike, so the one compiled forward serves both.
    placed = jax.tree.map(lambda a, m: jax.device_put(a, m.sharding), params, merged)
    np.testing.assert_array_equal(apply(merged, x, t), apply(placed, x, t))
    assert run.record.init_sha256 == params_digest(params) and set(run.frozen) == {"base"}
    # A full run of the same architecture, later in the same process, starts from the network's params, not
    # from the LoRA run's adapters (the compiled initialiser is not shared between the two).
    c = tiny_config()
    c.diffusion.schedule = "linear"
    full = training.init_state(resolve(c), make_mesh(jax.devices()[:1]))
    assert jax.tree.structure(full.params) == jax.tree.structure(spec.param_shapes())


def test_lora_trains_only_the_adapters_and_checkpoints_them_alone(source, lora_run):
    root, spec, params = source
    workdir, c, result = lora_run
    flat = traverse_util.flatten_dict(result.state.params)
    assert {p[-2:] for p in flat} == {("lora", "down"), ("lora", "up")}
    kernels = {p[:-2] for p in flat}
    want = {p[:-1] for p in adapters.adapted_paths(spec.param_shapes(), LORA["targets"])}
    assert kernels == want and any(p[0] == "mid_attn_1" for p in kernels) and any(len(p) > 1 for p in kernels)
    assert any(np.any(np.asarray(v)) for p, v in flat.items() if p[-1] == "up")  # the adapters moved
    # The frozen base is bit-identical (the run's copy holds it, and the export is base + adapters).
    _equal(models.load(str(workdir / adapters.BASE_DIR))[1], params)
    saved, state, meta = training.load_checkpoint(str(workdir))
    assert jax.tree.structure(state.params) == jax.tree.structure(result.state.params)
    adapter_bytes = sum(x.nbytes for x in leaves(state.params))
    base_bytes = sum(x.nbytes for x in leaves(params))
    assert adapter_bytes * 10 < base_bytes
    ckpt_bytes = sum(f.stat().st_size for f in (workdir / "checkpoints").rglob("*") if f.is_file())
    assert ckpt_bytes < base_bytes, (ckpt_bytes, base_bytes)  # Adam's moments and the EMA included
    # workdir/model is the merged EMA model, the LoRA file beside it merges to the same params.
    out_spec, out = models.load(str(workdir / "model"))
    assert out_spec.architecture() == spec.architecture() and out_spec.info["step"] == 2
    # (each merged in one program, not one per kernel)
    _equal(out, jax.jit(adapters.merge, static_argnums=2)(params, state.ema_params, LORA["alpha"] / LORA["rank"]))
    read = lora.read_lora(str(workdir / adapters.LORA_FILE))
    again = jax.jit(lambda p: lora.apply_lora(spec, p, read))(params)
    for a, b in zip(leaves(again), leaves(out)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not all(np.array_equal(a, b) for a, b in zip(leaves(out), leaves(params)))
    # training.load_params reads the same merged model from the checkpoint (with the base copy).
    _equal(training.load_params(str(workdir))[1], out)


def test_lora_resume_uses_the_base_copy(source, lora_run, tmp_path):
    root, spec, params = source
    workdir, c, result = lora_run
    c4 = ft_config(root / "src", num_steps=4)
    c4.training.lora.update(LORA)
    copy = tmp_path / "lora"
    shutil.copytree(workdir, copy)
    moved = root / "src_moved"
    shutil.move(str(root / "src"), moved)
    try:
        rest = train(c4, copy)
    finally:
        shutil.move(str(moved), root / "src")
    assert rest.steps_run == 2
    _equal(models.load(str(copy / adapters.BASE_DIR))[1], params)


# -- diffusers' format, at a small random UNet2DConditionModel


ARCH = {"block_out_channels": (32, 64), "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "layers_per_block": 1, "attention_head_dim": 2,
        "cross_attention_dim": 16, "norm_groups": 8, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0}


def test_the_lora_file_loads_into_diffusers_and_back_into_ddim_jax(tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    torch.manual_seed(0)
    a = ARCH
    unet = diffusers.UNet2DConditionModel(
        in_channels=4, out_channels=4, down_block_types=a["down_block_types"], up_block_types=a["up_block_types"],
        block_out_channels=a["block_out_channels"], layers_per_block=a["layers_per_block"],
        attention_head_dim=a["attention_head_dim"], cross_attention_dim=a["cross_attention_dim"],
        norm_num_groups=a["norm_groups"], norm_eps=a["norm_eps"], flip_sin_to_cos=True, freq_shift=0).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    spec = ModelSpec("unet2d_condition", ARCH, 8, 4, {"name": "linear", "num_timesteps": 1000}, "epsilon")
    params = convert.convert_unet2d_condition(unet.state_dict(), in_channels=4, out_channels=4, **ARCH)
    targets = ("attention", "feed_forward", "conv1x1", "conv3x3")
    paths = adapters.adapted_paths(spec.param_shapes(), targets)
    assert {adapters.target_of(p, s) for p, s in paths.items()} == set(targets)
    alpha = 6.0

    # Random adapters of init_adapters' shapes, drawn on the host: A uniform as init_adapters draws it, and a
    # random B, so the update matters.
    rng = np.random.default_rng(1)
    ad = jax.tree.map(lambda s: rng.uniform(-1, 1, s.shape).astype(np.float32) / np.sqrt(np.prod(s.shape[:-1])),
                      jax.eval_shape(lambda k: adapters.init_adapters(k, paths, 3), jax.random.key(0)))
    ad = jax.tree_util.tree_map_with_path(
        lambda p, v: (0.3 * rng.standard_normal(v.shape)).astype(np.float32) if p[-1].key == "up" else v, ad)
    merged = jax.jit(adapters.merge, static_argnums=2)(params, ad, alpha / 3)  # one program, not one per kernel
    path = adapters.save_lora(str(tmp_path / "pytorch_lora_weights.safetensors"), spec, ad, alpha)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 5, 16)).astype(np.float32)
    t = np.array([10, 900])
    model = cond_unet.UNet2DCondition(in_channels=4, out_channels=4, **ARCH)
    ours = np.asarray(jax.jit(lambda p: model.apply({"params": p}, x, t, ctx))(merged))

    def run_torch():
        with torch.no_grad():
            out = unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t), torch.from_numpy(ctx)).sample
        return out.numpy().transpose(0, 2, 3, 1)

    base = run_torch()

    # What StableDiffusionPipeline.load_lora_weights does for the UNet (its load_lora_into_unet), without the
    # pipeline's other components: the UNet's load_lora_adapter reads the file and its adapter metadata.
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert metadata["unet.lora_alpha"] == alpha and metadata["unet.r"] == 3  # as save_lora_weights writes them
    unet.load_lora_adapter(str(tmp_path), weight_name=os.path.basename(path), prefix="unet")
    want = run_torch()
    assert np.abs(want - base).max() > 0.01 * np.abs(want).max()  # the LoRA changes the output
    assert np.abs(ours - want).max() / np.abs(want).max() < 1e-4

    read = lora.read_lora(path)
    back = jax.jit(lambda p: lora.apply_lora(spec, p, read))(params)  # one program, not one per kernel
    for u, v in zip(leaves(back), leaves(merged)):
        np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-6)


# -- refusals


def test_bad_inputs_are_refused_in_one_line_and_nothing_is_written(source, tmp_path):
    root, spec, params = source
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "notes.txt").write_text("hello")
    bad = tmp_path / "nan"
    models.save(str(bad), spec, params)
    from safetensors.numpy import load_file, save_file

    flat = load_file(str(bad / models.PARAMS_FILE))
    flat["conv_in/kernel"][0, 0, 0, 0] = np.nan
    save_file(flat, str(bad / models.PARAMS_FILE))

    def refused(match, init_from=root / "src", **lo):
        c = ft_config(init_from)
        c.training.lora.update(lo)
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            train(c, tmp_path / "w")
        assert "\n" not in str(e.value) and not (tmp_path / "w").exists()
        assert e.match(match), str(e.value)

    refused(r"^training\.lora\.rank must be None \(no LoRA\) or a positive integer; got 0", rank=0)
    refused(r"^training\.lora\.targets must be distinct names from attention, feed_forward, conv1x1, conv3x3; "
            r"got 'mlp'", rank=2, targets=("attention", "mlp"))
    refused(r"^training\.init_from: .*notamodel' holds no model to start from", tmp_path / "notamodel")
    refused(r"^training\.init_from: .*nan' has non-finite parameters \(1 arrays, e\.g\. conv_in/kernel\)", bad)
    refused(r"^training\.init_from: .* does not exist", tmp_path / "nowhere")
    c = tiny_config()
    c.training.lora.rank = 2
    with pytest.raises(ValueError, match=r"^training\.lora\.rank needs training\.init_from"):
        train(c, tmp_path / "w")
    assert not (tmp_path / "w").exists()



def _config_file(name: str):
    """configs/<name>.py's config, as train.py's --config reads it: the file run afresh (it sees the environment)."""
    import importlib.util

    from helpers import ROOT

    spec = importlib.util.spec_from_file_location(f"config_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("name", ["digits_finetune", "digits_lora"])
def test_the_digits_fine_tuning_examples_take_the_digits_model_and_refuse_a_missing_one(name, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.delenv("DDIM_JAX_DIGITS_MODEL", raising=False)
    assert _config_file(name).training.init_from == "runs/digits"  # the default digits run (python train.py)
    base = spec_from_config(_config_file("digits"))
    models.save(str(tmp_path / "digits"), base, _random(base.param_shapes(), 0))
    monkeypatch.setenv("DDIM_JAX_DIGITS_MODEL", str(tmp_path / "digits"))
    run = resolve(_config_file(name))  # filled from the model, then validated
    assert run.spec.arch == base.arch and run.spec.schedule == base.schedule  # the architecture is the model's
    assert tuple(run.config.data.classes) == (0, 1, 2, 3, 4)
    if name == "digits_lora":  # the digits UNet has no attention: the adapters sit on its convolutions
        assert run.objective.rank == 4 and len(run.objective.paths) > 0
    monkeypatch.setenv("DDIM_JAX_DIGITS_MODEL", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"^training\.init_from: '.*missing' does not exist \(it names the "
                                                r"model to start from: a model directory or a training workdir\)$"):
        train(_config_file(name), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything is written
