"""CLIP's text encoder (``ddim_jax.clip_text``, kind ``clip_text``) against transformers' torch
``CLIPTextModel``: outputs at small random configs, SD 1.5's and SD 2.x's parameter layouts key for key (no
allocation), and a Stable Diffusion folder with ``text_encoder/`` and ``tokenizer/`` converted, loaded and
encoding prompts as transformers does."""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from ddim_jax import clip_text, convert, kinds, models
from ddim_jax.convert.clip_text import clip_text_key, clip_text_spec, convert_clip_text
from ddim_jax.tokenizer import CLIPTokenizer
from ddim_jax.unet import count_params

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from test_cond_unet import _sd_folder  # noqa: E402  (the tiny SD folder: UNet with cross_attention_dim 16)

# SD 1.5's and SD 2.x's text_encoder/config.json (the fields a CLIPTextConfig reads).
SD15_CONFIG = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408,
               "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05,
               "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "projection_dim": 768,
               "attention_dropout": 0.0, "dropout": 0.0, "torch_dtype": "float32"}
SD2_CONFIG = dict(SD15_CONFIG, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  hidden_act="gelu", projection_dim=512)


def _rel(a, b):
    """The largest difference relative to the reference's largest magnitude."""
    b = np.asarray(b)
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def _small_config(act, eos_token_id, **changes):
    return {**dict(architectures=["CLIPTextModel"], model_type="clip_text_model", vocab_size=64, hidden_size=32,
                   intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=12,
                   hidden_act=act, layer_norm_eps=1e-5, bos_token_id=62, eos_token_id=eos_token_id, pad_token_id=0),
            **changes}


def _reference(config, seed=0):
    torch.manual_seed(seed)
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)).eval()
    with torch.no_grad():  # layer norms start at (1, 0): random affine parameters everywhere
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return ref


# quick_gelu with the configs' legacy eos_token_id 2 (the pooled row is the largest id's, SD 1.x's rule);
# gelu with the end token's own id (its first position, transformers' rule since the fix), padded with id 0
# as SD 2.x folders pad.
@pytest.mark.parametrize("act, eos, pad", [("quick_gelu", 2, 63), ("gelu", 63, 0)])
def test_outputs_match_transformers(act, eos, pad):
    config = _small_config(act, eos)
    ref = _reference(config)
    spec = clip_text_spec(config, "config.json")
    params = convert_clip_text(ref.state_dict(), spec)
    ids = np.array([[62, 5, 9, 63] + [pad] * 8,  # padded
                    [62, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 63],  # unpadded, all 12 positions
                    [62, 40, 63] + [pad] * 9])
    # The same rows without a mask (as SD runs it) and with a padding mask (transformers' other use): an
    # all-ones mask is no mask, so one program computes both.
    pad_mask = (np.arange(12)[None] <= np.argmax(ids == 63, axis=1)[:, None]).astype(np.int64)
    net = spec.build()

    @jax.jit
    def run(params, ids, attention_mask):  # the outputs, and encode's context at clip_skip 0 and 1
        v = {"params": params}
        return (net.apply(v, ids, attention_mask), net.apply(v, ids, 0, attention_mask, method="encode"),
                net.apply(v, ids, 1, attention_mask, method="encode"))

    got, skip0, skip1 = run(params, np.concatenate([ids, ids]), np.concatenate([np.ones_like(ids), pad_mask]))
    for half, attention_mask in ((slice(0, 3), None), (slice(3, 6), pad_mask)):
        with torch.no_grad():
            mask_t = None if attention_mask is None else torch.from_numpy(attention_mask)
            want = ref(torch.from_numpy(ids), mask_t, output_hidden_states=True)
            want_skip1 = ref.final_layer_norm(want.hidden_states[-2]).numpy()
        assert len(got.hidden_states) == len(want.hidden_states) == 4
        assert _rel(got.last_hidden_state[half], want.last_hidden_state.numpy()) < 1e-5
        assert _rel(got.pooler_output[half], want.pooler_output.numpy()) < 1e-5
        assert _rel(got.hidden_states[-2][half], want.hidden_states[-2].numpy()) < 1e-5  # penultimate, no final LN
        assert _rel(got.hidden_states[0][half], want.hidden_states[0].numpy()) < 1e-5  # the embeddings
        assert _rel(skip1[half], want_skip1) < 1e-5  # diffusers' clip_skip=1
        assert _rel(skip0[half], want.last_hidden_state.numpy()) < 1e-5
    with pytest.raises(ValueError, match=r"clip_skip must be an integer in \[0, 2\]"):
        net.apply({"params": params}, ids, 3, method="encode")


def test_transformers_4_layout_with_position_ids_converts_the_same():
    """Stable Diffusion folders on the Hub hold transformers 4's keys (``text_model.`` and position_ids)."""
    config = _small_config("quick_gelu", 2)
    ref = _reference(config)
    spec = clip_text_spec(config, "config.json")
    new = convert_clip_text(ref.state_dict(), spec)
    old_sd = {"text_model." + k: v.numpy() for k, v in ref.state_dict().items()}
    old_sd["text_model.embeddings.position_ids"] = np.arange(12, dtype=np.int64)[None]
    old = convert_clip_text(old_sd, spec)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("config, count", [(SD15_CONFIG, 123_060_480), (SD2_CONFIG, 340_387_840)])
def test_sd_text_encoders_have_transformers_parameters_key_for_key(config, count):
    spec = clip_text_spec(config, "text_encoder/config.json")
    assert dict(spec.arch) == (clip_text.SD15 if config is SD15_CONFIG else clip_text.SD2)
    shapes = spec.param_shapes()  # jax.eval_shape: nothing allocated
    with torch.device("meta"):
        ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config))
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {}
    for path, leaf in traverse_util.flatten_dict(shapes).items():
        shape = tuple(leaf.shape)
        got[clip_text_key(path, "")] = shape[::-1] if path[-1] == "kernel" else shape  # Linear stores [out, in]
    assert got == want
    assert count_params(shapes) == sum(p.numel() for p in ref.parameters()) == count


def test_spec_rules_and_old_spec_files(tmp_path):
    te = clip_text_spec(_small_config("quick_gelu", 2, hidden_size=16, num_attention_heads=2), "c")
    assert kinds.get("clip_text").arch_fields == tuple(clip_text.SD15)
    assert "clip_text" not in kinds.trainable()
    with pytest.raises(ValueError, match=r"^a clip_text model takes no images: its image_size must be None; got 8$"):
        models.ModelSpec("clip_text", {}, 8, None, None, None)
    with pytest.raises(ValueError, match=r"^clip_text argument hidden_act must be one of quick_gelu, gelu; got 'relu'"):
        models.ModelSpec("clip_text", {"hidden_act": "relu"}, None, None, None, None)
    with pytest.raises(ValueError, match=r"^clip_text argument num_attention_heads must be a divisor of hidden_size"):
        models.ModelSpec("clip_text", {"hidden_size": 30, "num_attention_heads": 4}, None, None, None, None)
    # A spec.json written before text encoders existed: a latent SD model, as its to_dict wrote it.
    old = {"kind": "unet2d_condition", "arch": {"block_out_channels": [16], "layers_per_block": 1,
                                                "down_block_types": ["CrossAttnDownBlock2D"],
                                                "up_block_types": ["CrossAttnUpBlock2D"],
                                                "attention_head_dim": 2, "cross_attention_dim": 16, "norm_groups": 4},
           "image_size": 4, "channels": 4, "schedule": {"name": "scaled_linear", "num_timesteps": 1000},
           "prediction_type": "epsilon", "num_classes": None, "null_label": None,
           "autoencoder": {"kind": "autoencoder_kl", "arch": {"block_out_channels": [8], "layers_per_block": 1,
                                                              "latent_channels": 4, "norm_groups": 4},
                           "image_size": 4, "channels": 3, "schedule": None, "prediction_type": None,
                           "num_classes": None, "null_label": None},
           "scale_factor": 0.18215, "info": {}}
    spec = models.ModelSpec.from_dict(old)
    assert spec.text_encoder is None and spec.clip_skip == 0 and spec.to_dict() == old
    assert set(spec.param_shapes()) == {"denoiser", "autoencoder"}
    (tmp_path / models.SPEC_FILE).write_text(json.dumps({"format": models.FORMAT, "version": 1, "spec": old}))
    save_file({k: np.zeros(v.shape, np.float32) for k, v in
               traverse_util.flatten_dict(spec.param_shapes(), sep="/").items()}, str(tmp_path / models.PARAMS_FILE))
    loaded, params = models.load(tmp_path)
    assert loaded == spec and loaded.to_dict() == old and set(params) == {"denoiser", "autoencoder"}
    with pytest.raises(ValueError, match="has no text encoder"):
        spec.encode_text({}, np.zeros((1, 77), np.int32))
    with_te = models.ModelSpec.from_dict(dict(old, text_encoder=te.to_dict(), clip_skip=1))
    assert with_te.text_encoder == te and with_te.clip_skip == 1
    assert models.ModelSpec.from_dict(json.loads(json.dumps(with_te.to_dict()))) == with_te
    assert set(with_te.param_shapes()) == {"denoiser", "autoencoder", "text_encoder"}
    assert with_te.param_shapes()["text_encoder"] == te.param_shapes()
    for changes, message in [
        ({"text_encoder": clip_text_spec(_small_config("gelu", 2), "c").to_dict()},
         r"the text encoder's hidden states have width 32; the unet2d_condition model's cross_attention_dim is 16"),
        ({"text_encoder": te.to_dict(), "clip_skip": 3}, r"clip_skip must be an integer in \[0, 2\]"),
        ({"clip_skip": 1}, "clip_skip applies to models with a text encoder"),
        ({"text_encoder": old["autoencoder"]}, "text_encoder must be the spec of a text-encoder model"),
    ]:
        with pytest.raises(ValueError, match=message) as e:
            models.ModelSpec.from_dict(dict(old, **changes))
        assert "\n" not in str(e.value)


def _vocab_folder(root):
    """A tiny CLIP BPE vocabulary (lower-case letters, two merges) as a diffusers SD folder's tokenizer/."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = letters + [c + "</w>" for c in letters] + ["at</w>", "cat</w>", "<|startoftext|>", "<|endoftext|>"]
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (root / "merges.txt").write_text("#version: 0.2\na t</w>\nc at</w>\n")
    return CLIPTokenizer.from_files(root / "vocab.json", root / "merges.txt"), len(tokens)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A tiny SD folder with text_encoder/ (saved by transformers) and tokenizer/, converted once."""
    root = tmp_path_factory.mktemp("sd")
    _sd_folder(root / "sd")
    tok, vocab = _vocab_folder(root / "vocab")
    tok.save(str(root / "sd" / "tokenizer"))
    ref = _reference(_small_config("quick_gelu", 2, vocab_size=vocab, hidden_size=16, num_attention_heads=2,
                                   max_position_embeddings=77, bos_token_id=vocab - 2))
    ref.save_pretrained(root / "sd" / "text_encoder")
    assert convert.main([str(root / "sd"), str(root / "out")]) == 0
    return root, ref, tok


def test_a_stable_diffusion_folder_converts_with_its_text_encoder_and_tokenizer(sd):
    root, ref, tok = sd
    spec, params = models.load(root / "out")
    assert spec.text_encoder.kind == "clip_text" and spec.clip_skip == 0
    assert set(params) == {"denoiser", "autoencoder", "text_encoder"}
    assert sorted(os.listdir(root / "out" / models.TOKENIZER_DIR)) == sorted(
        ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"])
    loaded = models.load_tokenizer(root / "out")
    prompts = ["a cat", "cat at a cat", ""]
    ids = loaded(prompts)
    np.testing.assert_array_equal(ids, tok(prompts))
    assert ids.shape == (3, 77) and ids[0, 0] == tok.bos_id
    encode = jax.jit(spec.encode_text, static_argnames="clip_skip")
    context = encode(params, ids)
    with torch.no_grad():
        out = ref(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
        skip1 = ref.final_layer_norm(out.hidden_states[-2]).numpy()
    assert context.shape == (3, 77, 16) and context.dtype == jnp.float32
    assert _rel(context, out.last_hidden_state.numpy()) < 1e-5
    assert _rel(encode(params, ids, clip_skip=1), skip1) < 1e-5
    assert models.is_model_dir(str(root / "out"))
    dst = root / "copy"
    shutil.copytree(root / "out", dst)
    models.save(str(dst), spec, params, overwrite=True, tokenizer=loaded)  # a model with its tokenizer/ is replaced
    assert models.load(dst)[0] == spec and models.load_tokenizer(dst)(prompts).tolist() == ids.tolist()
    (dst / models.TOKENIZER_DIR / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):  # not with a foreign file in it
        models.save(str(dst), spec, params, overwrite=True, tokenizer=loaded)
    assert (dst / models.TOKENIZER_DIR / "notes.txt").read_text() == "mine"
    shutil.rmtree(dst / models.TOKENIZER_DIR)
    with pytest.raises(FileNotFoundError, match="has no tokenizer/"):
        models.load_tokenizer(dst)
    for bad, message in [(ids[:, :70], r"ids must be token ids of shape \[B, 77\]"),
                         (ids.astype(np.float32), "ids must be integer token ids"),
                         (ids + 100, r"ids must be token ids in \[0, 56\)")]:
        with pytest.raises(ValueError, match=message):
            spec.encode_text(params, bad)


def _broken(sd, tmp_path, edit):
    """A copy of the SD folder whose text_encoder/model.safetensors is ``edit(state dict)`` (None: removed)."""
    root, _, _ = sd
    src = tmp_path / "sd"
    shutil.copytree(root / "sd", src)
    weights = src / "text_encoder" / "model.safetensors"
    sd_ = load_file(str(weights))
    weights.unlink()
    sd_ = edit(sd_)
    if sd_ is not None:
        save_file(sd_, str(weights))
    return src


def _nan(sd_):
    sd_["final_layer_norm.weight"][3] = np.nan
    return sd_


@pytest.mark.parametrize("edit, message", [
    (lambda s: None, "text_encoder has no model.safetensors or pytorch_model.bin"),
    (lambda s: dict(s, **{"encoder.layers.1.mlp.fc1.weight": np.zeros((16, 48), np.float32)}),
     r"shape mismatch for key 'encoder.layers.1.mlp.fc1.weight': checkpoint has \(16, 48\), model expects \(48, 16\)"),
    (_nan, "key 'final_layer_norm.weight' has non-finite values"),
    (lambda s: dict(s, **{"text_projection.weight": np.zeros((4, 16), np.float32)}),
     "unexpected key 'text_projection.weight'"),
    (lambda s: {k: v for k, v in s.items() if k != "encoder.layers.0.self_attn.q_proj.bias"},
     "missing key 'encoder.layers.0.self_attn.q_proj.bias'"),
])
def test_bad_text_encoder_weights_are_one_line_naming_them(sd, tmp_path, capsys, edit, message):
    src = _broken(sd, tmp_path, edit)
    assert convert.main([str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("remove, message", [
    ("tokenizer", "has text_encoder/ but no tokenizer/"),
    ("text_encoder", "has tokenizer/ but no text_encoder/"),
    ("tokenizer/merges.txt", "merges.txt is missing"),
    ("text_encoder/config.json", "text_encoder has no config.json"),
])
def test_a_text_encoder_without_its_tokenizer_or_the_reverse_is_refused(sd, tmp_path, capsys, remove, message):
    root, _, _ = sd
    src = tmp_path / "sd"
    shutil.copytree(root / "sd", src)
    (shutil.rmtree if (src / remove).is_dir() else os.unlink)(src / remove)
    assert convert.main([str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()
