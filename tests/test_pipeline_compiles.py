"""The text-to-image path compiles once per (batch, size, steps): on a tiny converted Stable Diffusion folder, a
second prompt (other text, same batch, size and steps) and a second seed build no new XLA program, another step
count builds the sampler's again (and only it), another batch the text encoder's again.

Programs are counted by JAX itself, whatever the code under test does: its monitoring events
(``jax.monitoring``: ``jaxpr_trace_duration`` once per trace of a jitted function, ``backend_compile_duration``
once per executable built, by XLA or from the persistent compilation cache) and, to tell the programs apart,
the "Compiling <name> with global shapes and types ..." record ``jax.log_compiles`` writes for each program
lowered (the text encoder's is the one that takes ``int32[rows, 77]`` token ids). The last test checks that
this count sees a pipeline that builds its jitted functions anew for every call."""

import contextlib
import logging
import os
import re

import jax
import numpy as np
import pytest

from ddim_jax import convert, loading, models, pipelines

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from test_clip_text import _reference, _small_config, _vocab_folder  # noqa: E402  (a tiny CLIP and its BPE)

PXLA = "jax._src.interpreters.pxla"  # the logger of "Compiling ..." records
TRACE = "/jax/core/compile/jaxpr_trace_duration"
COMPILE = "/jax/core/compile/backend_compile_duration"
SIDE, STEPS, GUIDANCE = 8, 3, 7.5  # image side (a one-level VAE: latents 8x8), sampling steps, SD's guidance scale


class _Lowered(logging.Handler):
    """``(name, input types)`` of each program JAX lowers, from ``jax.log_compiles``' records."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.programs = []

    def emit(self, record):
        if record.getMessage().startswith("Compiling ") and isinstance(record.args, tuple) and len(record.args) > 1:
            self.programs.append((str(record.args[0]), tuple(str(a) for a in record.args[1])))


@contextlib.contextmanager
def counted():
    """What JAX does inside the block: ``{"traces": [names], "compiles": [names], "lowered": [(name, input
    types)]}`` (a program built anew is traced, lowered and compiled)."""
    seen = {"traces": [], "compiles": [], "lowered": []}
    kinds = {TRACE: "traces", COMPILE: "compiles"}

    def listener(event, duration, **kwargs):
        if event in kinds:
            seen[kinds[event]].append(str(kwargs.get("fun_name")))

    handler = _Lowered()
    logger, top = logging.getLogger(PXLA), logging.getLogger("jax")
    logger.addHandler(handler)
    propagate, top.propagate = top.propagate, False  # the log_compiles records go to the handler alone
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        with jax.log_compiles(True):
            yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
        logger.removeHandler(handler)
        top.propagate = propagate
        seen["lowered"] += handler.programs


NOTHING = {"traces": [], "compiles": [], "lowered": []}


def _text_encoders(seen):
    """The programs lowered that take weights and token ids ``[rows, 77]``: the text encoder's (not the ids'
    transfer, which takes the ids alone)."""
    return [(name, types) for name, types in seen["lowered"]
            if any(re.fullmatch(r"int32\[\d+,77\]", t) for t in types) and any(t.startswith("float32[") for t in types)]


def _named(seen, word):
    return [name for name, _ in seen["lowered"] if word in name]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A tiny SD folder (one-level UNet and VAE, a three-layer CLIP and its BPE), converted and loaded."""
    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        in_channels=4, out_channels=4, block_out_channels=(16,), down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",), layers_per_block=1, attention_head_dim=2, cross_attention_dim=16,
        norm_num_groups=8, sample_size=SIDE)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,), layers_per_block=1,
                                  latent_channels=4, norm_num_groups=8, sample_size=SIDE,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    unet.save_pretrained(root / "sd" / "unet", safe_serialization=True)
    vae.save_pretrained(root / "sd" / "vae", safe_serialization=True)
    diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                            timestep_spacing="leading").save_pretrained(root / "sd" / "scheduler")
    tokenizer, vocab = _vocab_folder(root / "vocab")
    tokenizer.save(str(root / "sd" / "tokenizer"))
    text = _reference(_small_config("quick_gelu", 2, vocab_size=vocab, hidden_size=16, num_attention_heads=2,
                                    max_position_embeddings=77, bos_token_id=vocab - 2))
    text.save_pretrained(root / "sd" / "text_encoder")
    assert convert.main([str(root / "sd"), str(root / "jax")]) == 0
    spec, params = loading.load(root / "jax")
    assert spec.text_encoder is not None and spec.output_shape == (SIDE, SIDE, 3)
    return spec, params, models.load_tokenizer(root / "jax")


def _text_to_image(sd, prompts, seed=0, steps=STEPS):
    """Prompts to images as sample.py's text2img does: the prompts and the empty negative prompt through the text
    encoder in one call, then guided DDIM and the decoder."""
    spec, params, tokenizer = sd
    context, null = pipelines.encode_prompts(spec, params, tokenizer, prompts)
    images = pipelines.text_to_image(spec, params, context, null, guidance=GUIDANCE, num_steps=steps, seed=seed)
    return np.asarray(jax.block_until_ready(images))


def test_another_prompt_or_seed_compiles_nothing_and_another_step_count_only_the_sampler(sd):
    spec, params, tokenizer = sd
    # Programs another test of this process built for the same shapes (another step count of a same-sized
    # model) would be served from JAX's caches: the counts below start from empty ones.
    jax.clear_caches()
    pipelines._JITTED.clear()
    with counted() as first:
        a = _text_to_image(sd, ["a cat", "cat"])
    # The count sees the path's programs: the text encoder (prompts and negatives: 4 rows), the sampler, the decoder.
    assert [types[-1] for _, types in _text_encoders(first)] == ["int32[4,77]"], first["lowered"]
    assert len(_named(first, "sample_scan")) == 1 and len(_named(first, "decode")) == 1, first["lowered"]
    assert len(first["compiles"]) == len(first["lowered"]) >= 3 and len(first["traces"]) >= 3, first

    with counted() as other_prompts:  # other text (other ids and lengths), the same batch of 2
        b = _text_to_image(sd, ["cat at a cat", "a t"])
    with counted() as other_seed:
        c = _text_to_image(sd, ["a cat", "cat"], seed=1)
    assert other_prompts == NOTHING, other_prompts
    assert other_seed == NOTHING, other_seed
    # ... and they made other images (not a result served again).
    assert np.abs(a - b).mean() > 1e-3 and np.abs(a - c).mean() > 1e-3

    with counted() as other_steps:  # the sampler's scan has another length: its program alone is built again
        _text_to_image(sd, ["a cat", "cat"], steps=STEPS + 1)
    assert len(_named(other_steps, "sample_scan")) == 1, other_steps["lowered"]
    assert not _text_encoders(other_steps) and not _named(other_steps, "decode"), other_steps["lowered"]
    with counted() as again:
        _text_to_image(sd, ["a t", "cat"], seed=2, steps=STEPS + 1)
    assert again == NOTHING, again

    with counted() as other_batch:  # three prompts: the text encoder's program for 6 rows
        pipelines.encode_prompts(spec, params, tokenizer, ["a", "cat", "at"])
    assert [types[-1] for _, types in _text_encoders(other_batch)] == ["int32[6,77]"], other_batch["lowered"]


def test_the_count_sees_a_pipeline_that_builds_its_jitted_functions_per_call(sd, monkeypatch):
    """A pipeline that re-traced for every prompt (a fresh ``jax.jit`` of its text encoder per call) shows up on
    the second prompt: the test above can fail."""
    spec, params, tokenizer = sd
    jitted = pipelines._jitted

    def per_call(spec, what, clip_skip=None):
        pipelines._JITTED.clear()
        return jitted(spec, what, clip_skip)

    monkeypatch.setattr(pipelines, "_jitted", per_call)
    pipelines.encode_prompts(spec, params, tokenizer, ["a cat", "cat"])
    with counted() as other_prompts:
        pipelines.encode_prompts(spec, params, tokenizer, ["cat at a cat", "a t"])
    assert len(_text_encoders(other_prompts)) == 1 and other_prompts["traces"] and other_prompts["compiles"], \
        other_prompts
