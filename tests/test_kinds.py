"""The model-kind registry: a new kind of network is one Flax module and one entry, and then trains,
exports, loads and samples like the built-in ones; the architecture fields and their checks are the
entry's, for configs and spec files alike."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from ddim_jax import experiments, kinds, loading, models, training
from ddim_jax.config import base_config, validate_config
from ddim_jax.parallel import make_mesh


class ToyNet(nn.Module):
    """A denoiser in a few lines: a 3x3 convolution, a learned shift per timestep (and label), another."""

    width: int = 8
    out_ch: int = 1
    num_classes: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, t, y=None, *, train=False):
        h = nn.Conv(self.width, (3, 3), dtype=self.dtype)(x) + nn.Embed(1000, self.width)(t)[:, None, None]
        if self.num_classes is not None:
            h = h + nn.Embed(self.num_classes, self.width)(y)[:, None, None]
        return nn.Conv(self.out_ch, (3, 3), dtype=self.dtype)(nn.silu(h)).astype(x.dtype)


def _check_toy(arch, need):
    need(isinstance(arch["width"], int) and arch["width"] >= 1, "width", "a positive integer")


@pytest.fixture
def toy():
    kinds.register("toy", kinds.ModelKind(ToyNet, {"out_ch": lambda s: s.channels, "num_classes": lambda s: s.num_labels},
                                          kinds.denoiser_inputs, defaults={"width": 4}, check=_check_toy))
    yield
    del kinds.KINDS["toy"]


def _toy_config():
    c = base_config("toy")
    c.diffusion.num_timesteps = 100
    c.training.update(batch_size=16, num_steps=4, warmup_steps=1, log_every=2, checkpoint_every=4, sample_every=0,
                      num_sample_images=4, sample_steps=2)
    return c


def test_a_registered_kind_trains_exports_and_samples(toy, tmp_path):
    config = _toy_config()
    assert config.model.to_dict() == {"kind": "toy", "width": 4, "num_classes": None}
    result = training.train(config, str(tmp_path), progress=False)
    assert result.steps_run == 4
    spec, params = loading.load(tmp_path)
    assert (spec.kind, dict(spec.arch), spec.info["step"]) == ("toy", {"width": 4}, 4)
    assert models.load(tmp_path / models.EXPORT_DIR)[0] == spec  # spec.json round trip
    images = experiments.generate(experiments.Model(spec, params, make_mesh()), 8, 8, 3, seed=0, progress=False)
    assert images.shape == (8, 8, 8, 1) and images.dtype == np.uint8


def test_the_entry_owns_the_architecture_fields_and_their_checks(toy):
    entry = kinds.get("toy")
    assert entry.arch_fields == ("width",)  # the module's fields, less those the spec fills in and dtype
    with pytest.raises(ValueError, match=r"unknown toy argument 'depth'; allowed: width$"):
        models.ModelSpec("toy", {"depth": 2}, 8, 1, {"name": "cosine", "num_timesteps": 100})
    with pytest.raises(ValueError, match=r"^toy argument width must be a positive integer; got 0$"):
        models.ModelSpec("toy", {"width": 0}, 8, 1, {"name": "cosine", "num_timesteps": 100})
    config = _toy_config()
    config.model.width = -1
    with pytest.raises(ValueError, match=r"^model.width must be a positive integer; got -1$"):
        validate_config(config)
    with pytest.raises(ValueError, match="already registered"):
        kinds.register("toy", entry)
    with pytest.raises(ValueError, match="remat is not offered for toy"):
        models.ModelSpec("toy", {}, 8, 1, {"name": "cosine", "num_timesteps": 100}).build(remat=True)


@pytest.mark.parametrize("kind, arch, field", [
    ("unet", {"ch_mult": []}, "ch_mult"),
    ("unet", {"ch": 32, "norm_groups": 12}, "norm_groups"),
    ("unet", {"dropout": float("nan")}, "dropout"),
    ("autoencoder_kl", {"block_out_channels": [0, 0]}, "block_out_channels"),
    ("autoencoder_vq", {"num_embeddings": 1}, "num_embeddings"),
    ("unet2d_condition", {"attention_head_dim": 0}, "attention_head_dim"),
])
def test_a_spec_file_with_a_bad_architecture_is_refused_by_field(kind, arch, field):
    diffusion = kinds.get(kind).objective == "diffusion"
    with pytest.raises(ValueError, match=rf"^{kind} argument {field} must be .*; got ") as e:
        models.ModelSpec.from_dict({"kind": kind, "arch": arch, "image_size": 32, "channels": 4,
                                    "schedule": {"name": "cosine", "num_timesteps": 10} if diffusion else None,
                                    "prediction_type": "epsilon" if diffusion else None})
    assert "\n" not in str(e.value)


def test_the_registry_derives_the_built_in_kinds_fields():
    # The hand-kept lists these replace, so that stored spec.json files keep loading.
    assert kinds.get("unet").arch_fields == ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout",
                                             "resamp_with_conv", "norm_groups")
    assert kinds.get("autoencoder_vq").arch_fields == ("block_out_channels", "layers_per_block", "latent_channels",
                                                       "num_embeddings", "embedding_dim", "beta", "norm_groups")
    assert "num_class_embeds" not in kinds.get("unet2d_condition").arch_fields
    assert {"unet", "cross_attention_unet", "autoencoder_kl", "autoencoder_vq"} <= set(kinds.trainable())
    assert "unet2d_condition" not in kinds.trainable()  # conditioned on context arrays: converted, not trained


def test_a_model_may_hold_what_a_training_config_may_not():
    # One channel per GroupNorm group trains badly (the blocks cannot see t), so configs refuse it; a
    # converted model built that way is still a valid model.
    arch = dict(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), norm_groups=32)
    models.ModelSpec("unet", arch, 8, 1, {"name": "cosine", "num_timesteps": 10})
    need = []
    kinds.get("unet").train_check(kinds.get("unet").full_arch(arch), lambda ok, field, what: need.append((ok, field)))
    assert need == [(False, "norm_groups")]


def test_a_kind_conditioned_on_context_arrays_is_not_offered_to_train_py():
    entry = kinds.get("unet2d_condition")
    with pytest.raises(ValueError, match="conditioned on context arrays is not trainable"):
        kinds.ModelKind(entry.module, entry.from_spec, entry.example_inputs, conditioning="context")
