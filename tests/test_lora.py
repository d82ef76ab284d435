"""LoRA loading (``ddim_jax.lora``) against diffusers, transformers and peft: a random LoRA added with peft to a
small random ``UNet2DConditionModel`` and ``CLIPTextModel``, saved by diffusers, merged into the converted params;
the UNet's and the text encoder's outputs equal the torch modules' with the adapter active (and the UNet's after
diffusers' own loading of the file), at two scales. The same weights under kohya's names merge to the same params;
bad files are refused in one line."""

import copy
import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ddim_jax import cond_unet, convert, lora
from ddim_jax.convert.clip_text import clip_text_spec, convert_clip_text
from ddim_jax.models import ModelSpec, params_digest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ARCH = {"block_out_channels": (32, 64), "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "layers_per_block": 1, "attention_head_dim": 2,
        "cross_attention_dim": 16, "norm_groups": 8, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0}
CLIP = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "max_position_embeddings": 12, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "bos_token_id": 62,
        "eos_token_id": 63, "pad_token_id": 0}
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "time_emb_proj"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
WEIGHTS = "pytorch_lora_weights.safetensors"
ALPHA = {"to_k": 3, "fc1": 2}  # alpha_pattern; the others' alpha is 8


def _diffusers_unet():
    a = ARCH
    return diffusers.UNet2DConditionModel(
        in_channels=4, out_channels=4, down_block_types=a["down_block_types"], up_block_types=a["up_block_types"],
        block_out_channels=a["block_out_channels"], layers_per_block=a["layers_per_block"],
        attention_head_dim=a["attention_head_dim"], cross_attention_dim=a["cross_attention_dim"],
        norm_num_groups=a["norm_groups"], norm_eps=a["norm_eps"], flip_sin_to_cos=a["flip_sin_to_cos"],
        freq_shift=a["freq_shift"])


def _spec(text_encoder):
    """A latent model of the small UNet with its text encoder (the autoencoder's params are only carried along)."""
    ae = ModelSpec("autoencoder_kl", {"block_out_channels": (16, 32), "layers_per_block": 1, "latent_channels": 4,
                                      "norm_groups": 8}, 16, 3, None, None)
    schedule = {"name": "scaled_linear", "num_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012}
    return ModelSpec("unet2d_condition", ARCH, 8, 4, schedule, "epsilon", autoencoder=ae, scale_factor=0.18215,
                     text_encoder=text_encoder)


def _split(key):
    """(part, module, "down" or "up") of a key diffusers wrote: peft's lora_A/lora_B or its lora.down/lora.up."""
    part, module, which = re.fullmatch(r"(unet|text_encoder)\.(.+)\.(lora_A|lora_B|lora\.down|lora\.up)\.weight",
                                       key).groups()
    return part, module, "down" if which in ("lora_A", "lora.down") else "up"


def _alpha(module):
    return next((a for name, a in ALPHA.items() if module.endswith("." + name)), 8)


def _kohya(state_dict, alpha=_alpha):
    """diffusers' LoRA keys renamed by kohya's rule (sd-scripts' networks/lora.py: ``lora_unet_`` / ``lora_te_`` +
    the module's path with ``_`` for ``.``, the text encoder's as transformers 4 named it, under ``text_model.``;
    A -> lora_down, B -> lora_up, alpha a scalar tensor)."""
    out = {}
    for key, value in state_dict.items():
        part, module, which = _split(key)
        if part == "text_encoder" and not module.startswith("text_model."):
            module = "text_model." + module
        name = ("lora_unet_" if part == "unet" else "lora_te_") + module.replace(".", "_")
        out[f"{name}.lora_{which}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(float(alpha(module)))
    return out


def _random_lora(model, targets, inject):
    """``model`` with a peft LoRA on ``targets`` (rank 4, alpha 8, conv1's rank 2, ALPHA's alphas) and random B."""
    from peft import LoraConfig

    model = copy.deepcopy(model)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, rank_pattern={"conv1": 2},
                        alpha_pattern={k: v for k, v in ALPHA.items() if k in targets})
    inject(model, config)
    with torch.no_grad():  # peft starts B at zero: a random B makes the update matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn_like(p))
    return model, config.to_dict()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from diffusers.utils import convert_state_dict_to_diffusers, scale_lora_layers, unscale_lora_layers
    from peft import inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    base = _diffusers_unet().eval()
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP)).eval()
    with torch.no_grad():  # random weights everywhere (diffusers zero-initialises some output layers)
        for p in [*base.parameters(), *text.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    text_spec = clip_text_spec(CLIP, "config.json")
    spec = _spec(text_spec)
    shapes = spec.param_shapes()
    params = {"denoiser": convert.convert_unet2d_condition(base.state_dict(), in_channels=4, out_channels=4, **ARCH),
              "autoencoder": jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["autoencoder"]),
              "text_encoder": convert_clip_text(text.state_dict(), text_spec)}
    adapted, unet_meta = _random_lora(base, UNET_TARGETS, lambda m, c: m.add_adapter(c))
    # transformers' add_adapter wants a newer peft than the registry has; peft's own injection is the same.
    text_adapted, text_meta = _random_lora(text, TEXT_TARGETS, lambda m, c: inject_adapter_in_model(c, m))
    unet_layers = get_peft_model_state_dict(adapted)  # peft's names: <module>.lora_A.weight, .lora_B.weight
    text_layers = get_peft_model_state_dict(text_adapted)
    save = diffusers.StableDiffusionPipeline.save_lora_weights
    save(root / "lora", unet_lora_layers=unet_layers, text_encoder_lora_layers=text_layers,
         unet_lora_adapter_metadata=unet_meta, text_encoder_lora_adapter_metadata=text_meta)
    save(root / "plain", unet_lora_layers=unet_layers)  # no adapter metadata: alpha = r
    # diffusers' training scripts' names (Linear layers' A and B as lora.down / lora.up).
    save(root / "named", unet_lora_layers=convert_state_dict_to_diffusers(unet_layers),
         unet_lora_adapter_metadata=unet_meta)
    saved = load_file(root / "lora" / WEIGHTS)  # the keys as diffusers writes them

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 5, 16)).astype(np.float32)
    t = np.array([10, 900])
    ids = np.array([[62, 5, 9, 63] + [0] * 8, [62, *range(3, 13), 63]])

    def run_torch(unet, scale=None):
        kwargs = None if scale is None else {"scale": scale}
        with torch.no_grad():
            out = unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t), torch.from_numpy(ctx),
                       cross_attention_kwargs=kwargs).sample
        return out.numpy().transpose(0, 2, 3, 1)

    def run_text(model, scale=1.0):  # the pipelines' text-encoder LoRA scale
        scale_lora_layers(model, scale)
        with torch.no_grad():
            out = model(torch.from_numpy(ids)).last_hidden_state.numpy()
        unscale_lora_layers(model, scale)
        return out

    model = cond_unet.UNet2DCondition(in_channels=4, out_channels=4, **ARCH)
    apply = jax.jit(lambda p: model.apply({"params": p["denoiser"]}, x, t, ctx))
    encode = jax.jit(lambda p: spec.encode_text(p, ids))
    return {"root": root, "base": base, "adapted": adapted, "text": text, "text_adapted": text_adapted, "spec": spec,
            "params": params, "saved": saved, "run_torch": run_torch, "run_text": run_text,
            "run_ours": lambda p: np.asarray(apply(p)), "encode": lambda p: np.asarray(encode(p))}


def _close(got, want):
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 1e-4, f"relative error {err:.2e}"


def _equal(a, b):
    jax.tree.map(lambda u, v: np.testing.assert_array_equal(np.asarray(u), np.asarray(v)), a, b)


def test_a_diffusers_lora_matches_the_torch_modules_with_the_adapter_active(setup):
    s = setup
    spec, params, path = s["spec"], s["params"], s["root"] / "lora" / WEIGHTS
    before = params_digest(params)
    base_out, base_text = s["run_ours"](params), s["encode"](params)
    _close(base_out, s["run_torch"](s["base"]))
    _close(base_text, s["run_text"](s["text"]))
    for scale in (1.0, 0.5):
        merged = lora.apply_lora(spec, params, path, scale=scale)
        want, want_text = s["run_torch"](s["adapted"], scale), s["run_text"](s["text_adapted"], scale)
        assert np.abs(want - base_out).max() > 100 * 1e-4 * np.abs(want).max()  # the LoRA changes the outputs
        assert np.abs(want_text - base_text).max() > 100 * 1e-4 * np.abs(want_text).max()
        _close(s["run_ours"](merged), want)
        _close(s["encode"](merged), want_text)
    assert params_digest(params) == before  # merging made new params
    # Only the adapted kernels changed; the autoencoder's params are the same arrays.
    flat_before, flat_after = traverse_util.flatten_dict(params), traverse_util.flatten_dict(merged)
    changed = {p for p in flat_before if not np.array_equal(flat_before[p], flat_after[p])}
    assert changed == set(traverse_util.flatten_dict(lora.lora_delta(spec, path)))
    assert len(changed) == len(s["saved"]) // 2 and all(p[-1] == "kernel" for p in changed)
    assert {p[0] for p in changed} == {"denoiser", "text_encoder"}
    assert all(flat_after[p] is flat_before[p] for p in flat_before if p[0] == "autoencoder")

    # diffusers' own loading of the file (its adapter metadata: r, alpha, rank and alpha patterns).
    loaded = copy.deepcopy(s["base"])
    loaded.load_lora_adapter(str(s["root"] / "lora"), weight_name=WEIGHTS, prefix="unet")
    _close(s["run_ours"](lora.apply_lora(spec, params, path, scale=0.5)), s["run_torch"](loaded, 0.5))


def test_without_adapter_metadata_alpha_is_the_rank_as_in_diffusers(setup):
    s = setup
    loaded = copy.deepcopy(s["base"])
    loaded.load_lora_adapter(str(s["root"] / "plain"), weight_name=WEIGHTS, prefix="unet")
    merged = lora.apply_lora(s["spec"], s["params"], s["root"] / "plain" / WEIGHTS)
    _close(s["run_ours"](merged), s["run_torch"](loaded))
    plain = lora.read_lora(s["root"] / "plain" / WEIGHTS)
    assert {m.scaling for m in plain.modules} == {1.0}
    with_meta = lora.read_lora(s["root"] / "lora" / WEIGHTS)
    assert {(m.part, m.module): m.scaling for m in with_meta.modules} == {
        (m.part, m.module): _alpha(m.module) / m.rank for m in with_meta.modules}
    assert {m.rank for m in with_meta.modules if m.module.endswith("conv1")} == {2}


def test_kohya_names_merge_to_the_same_params(setup, tmp_path):
    from safetensors.torch import save_file

    s = setup
    save_file({k: v.contiguous() for k, v in _kohya(s["saved"]).items()}, tmp_path / "kohya.safetensors")
    parsed = lora.read_lora(tmp_path / "kohya.safetensors")
    assert parsed.format == "kohya" and len(parsed.modules) == len(s["saved"]) // 2
    got = lora.apply_lora(s["spec"], s["params"], tmp_path / "kohya.safetensors", scale=0.7)
    _equal(got, lora.apply_lora(s["spec"], s["params"], s["root"] / "lora" / WEIGHTS, scale=0.7))
    # diffusers' reading of a kohya file. (Its kohya converter renames attention layers' alphas to names that
    # no module matches, so an alpha that differs from the most common one is lost there: one alpha for all.)
    uniform = _kohya({k: v for k, v in s["saved"].items() if k.startswith("unet.")}, lambda m: 6)
    save_file({k: v.contiguous() for k, v in uniform.items()}, tmp_path / "uniform.safetensors")
    state_dict, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(tmp_path / "uniform.safetensors"))
    loaded = copy.deepcopy(s["base"])
    loaded.load_lora_adapter(state_dict, network_alphas=alphas, prefix="unet")
    ours = lora.apply_lora(s["spec"], s["params"], tmp_path / "uniform.safetensors", scale=0.7)
    _close(s["run_ours"](ours), s["run_torch"](loaded, 0.7))


def test_older_diffusers_names_read_as_the_same_modules(setup):
    s = setup
    named = lora.read_lora(s["root"] / "named" / WEIGHTS)
    assert any(m.key.endswith(".lora.down.weight") for m in named.modules)
    unet_only = {k: v for k, v in s["saved"].items() if k.startswith("unet.")}
    want = lora.lora_delta(s["spec"], lora.parse_lora(unet_only, json.loads(_metadata(s["root"] / "lora" / WEIGHTS))))
    _equal(lora.lora_delta(s["spec"], named), want)
    old = {}
    for key, value in s["saved"].items():  # all in diffusers' old names, with alpha entries instead of metadata
        part, module, which = _split(key)
        old[f"{part}.{module}.lora.{which}.weight"] = value.numpy()
        old[f"{part}.{module}.alpha"] = np.float32(_alpha(module))
    _equal(lora.lora_delta(s["spec"], lora.parse_lora(old)), lora.lora_delta(s["spec"], s["root"] / "lora" / WEIGHTS))


def test_rank_stabilised_scaling_is_peft_s():
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q, self.to_k = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    config = LoraConfig(r=4, lora_alpha=6, target_modules=["to_q", "to_k"], alpha_pattern={"to_k": 5},
                        use_rslora=True)
    net = inject_adapter_in_model(config, Net())
    meta = {f"unet.{k}": v for k, v in json.loads(json.dumps(config.to_dict(), default=list)).items()}
    parsed = lora.parse_lora({f"unet.{k}": v for k, v in get_peft_model_state_dict(net).items()}, meta)
    assert {m.module: m.scaling for m in parsed.modules} == {
        name: getattr(net, name).scaling["default"] for name in ("to_q", "to_k")}
    kohya = lora.parse_lora({"lora_unet_to_q.lora_down.weight": np.ones((4, 8)),
                             "lora_unet_to_q.lora_up.weight": np.ones((8, 4)), "lora_unet_to_q.alpha": np.zeros(())})
    assert kohya.modules[0].scaling == 1.0  # sd-scripts: an alpha of 0 is none, alpha = r


def _metadata(path):
    from safetensors import safe_open

    with safe_open(path, "np") as f:
        return f.metadata()[lora.METADATA_KEY]


def test_the_delta_adds_at_a_traced_scale(setup):
    s = setup
    delta = lora.lora_delta(s["spec"], s["root"] / "lora" / WEIGHTS)
    traced = jax.jit(lora.add_delta)(s["params"], delta, 0.3)
    merged = lora.apply_lora(s["spec"], s["params"], s["root"] / "lora" / WEIGHTS, scale=0.3)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), traced, merged)


def _refused(setup, path, match, spec=None):
    before = params_digest(setup["params"])
    with pytest.raises(convert.ConversionError, match=match) as e:
        lora.apply_lora(spec or setup["spec"], setup["params"], path)
    assert "\n" not in str(e.value)
    assert params_digest(setup["params"]) == before


def test_bad_files_are_refused_in_one_line(setup, tmp_path):
    from safetensors.torch import save_file

    s = setup
    good = dict(s["saved"])
    key = {_split(k): k for k in good}  # (part, module, "down"/"up") -> the key diffusers wrote
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    qa, qb = key["unet", q, "down"], key["unet", q, "up"]
    k2a = key["unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "down"]

    def case(name, changes, match, drop=(), spec=None):
        sd = {k: v for k, v in good.items() if k not in drop}
        sd.update(changes)
        save_file(sd, tmp_path / f"{name}.safetensors")
        _refused(s, tmp_path / f"{name}.safetensors", match, spec)

    case("unknown", {"unet.mid_block.attentions.0.norm.weight": torch.ones(64)},
         r"unknown key 'unet\.mid_block\.attentions\.0\.norm\.weight'")
    case("other_module", {"unet.down_blocks.3.attentions.0.proj_in.lora_A.weight": torch.ones(4, 32, 1, 1),
                          "unet.down_blocks.3.attentions.0.proj_in.lora_B.weight": torch.ones(32, 4, 1, 1)},
         r"adapts module 'down_blocks\.3\.attentions\.0\.proj_in', which this model's unet does not have")
    te = "text_encoder.text_model.encoder.layers.5.self_attn.q_proj"  # a deeper text encoder's
    case("other_layer", {f"{te}.lora_A.weight": torch.ones(4, 16), f"{te}.lora_B.weight": torch.ones(16, 4)},
         r"adapts module 'text_model\.encoder\.layers\.5\.self_attn\.q_proj', which this model's text_encoder")
    case("other_shape", {k2a: torch.ones(4, 24)},  # a context width of 24, not 16
         rf"key '{re.escape(k2a)}' gives module .* shape \(32, 24\) .* the model's weight is \(32, 16\)")
    bad = good[qb].clone()
    bad[0, 0] = float("nan")
    case("nonfinite", {qb: bad}, rf"key '{re.escape(qb)}' has non-finite values")
    case("rank", {qb: torch.ones(32, 3)}, rf"rank mismatch: '{re.escape(qa)}' has rank 4")
    case("half", {}, rf"key '{re.escape(qb)}' has no down weight", drop=(qa,))
    case("twice", {f"unet.{q}.lora.down.weight": good[qa].clone()},  # A under two names
         rf"are both the down weight of module '{re.escape(q)}'")
    fc1a = next(k for k in good if k.startswith("text_encoder.") and ".layers.0.mlp.fc1.lora_A" in k)
    fc1b = fc1a.replace("lora_A", "lora_B")
    layout = ("text_encoder.text_model.", "text_encoder.")  # the same module in transformers 4's and 5's layouts
    swap = (lambda k: k.replace(*layout)) if ".text_model." in fc1a else (lambda k: k.replace(*layout[::-1]))
    case("layouts", {swap(fc1a): good[fc1a].clone(), swap(fc1b): good[fc1b].clone()}, "adapt the same weight")
    case("mixed", {"lora_unet_conv_in.lora_down.weight": torch.ones(4, 4, 3, 3)}, "mixes kohya keys")
    save_file({"conv_in.weight": torch.ones(2)}, tmp_path / "neither.safetensors")
    _refused(s, tmp_path / "neither.safetensors", r"matches neither LoRA format .* first key 'conv_in\.weight'")
    no_text = dataclasses.replace(s["spec"], text_encoder=None)
    case("text_encoder", {}, r"adapts the text encoder; this model has no text encoder", spec=no_text)
    save_file({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(4, 16),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(32, 4)},
              tmp_path / "sdxl.safetensors")
    _refused(s, tmp_path / "sdxl.safetensors", r"adapts a second text encoder \(text_encoder_2, SDXL's\)")
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8,
                                                                 "unet.use_dora": True})}
    save_file(good, tmp_path / "dora.safetensors", metadata=meta)
    _refused(s, tmp_path / "dora.safetensors", "sets use_dora=true")
    # Pickles are never loaded: a .bin file, or one named .safetensors.
    torch.save(good, tmp_path / "pytorch_lora_weights.bin")
    _refused(s, tmp_path / "pytorch_lora_weights.bin", r"\.safetensors files only")
    (tmp_path / "pickle.safetensors").write_bytes((tmp_path / "pytorch_lora_weights.bin").read_bytes())
    _refused(s, tmp_path / "pickle.safetensors", "cannot read .* as a safetensors file")


def test_another_kind_of_model_is_refused(setup):
    spec = ModelSpec("cross_attention_unet", {}, 8, 1, {"name": "linear", "num_timesteps": 1000}, "epsilon",
                     num_classes=10)
    with pytest.raises(convert.ConversionError,
                       match="apply to Stable Diffusion UNets .* this model is a cross_attention_unet"):
        lora.lora_delta(spec, setup["root"] / "lora" / WEIGHTS)
