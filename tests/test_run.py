"""The run record: what a run found when it started, kept beside its config (run.json, each checkpoint)."""

import json

import pytest

from ddim_jax import models
from ddim_jax.config import autoencoder_config, base_config, config_differences, to_dict
from ddim_jax.training import latent, loop
from ddim_jax.training.run import RECORD_FILE, Record

AE = models.ModelSpec("autoencoder_kl", dict(block_out_channels=(8, 8), layers_per_block=1, latent_channels=2,
                                             norm_groups=4), 8, 1, None, None)


def test_a_checkpoint_saved_before_run_records_reads_its_config_fields_as_its_record():
    # Runs once wrote what they found into their config; such a checkpoint still compares equal to the
    # config as asked for, and its record is read from those fields.
    old = to_dict(autoencoder_config())
    old["loss"]["lpips_sha256"] = "ab" * 32
    assert config_differences(old, autoencoder_config()) == []
    assert Record.of_saved({"config": old}) == Record(lpips_sha256="ab" * 32)
    old = to_dict(base_config("cross_attention_unet"))
    old["latent"].update(autoencoder="ae", scale_factor=0.5, autoencoder_spec=json.dumps(AE.to_dict()))
    record = Record.of_saved({"config": old})
    assert models.ModelSpec.from_dict(record.autoencoder) == AE and record.scale_factor == 0.5
    assert record.autoencoder_sha256 == ""  # not recorded then


def test_record_differences_name_the_fields():
    saved = Record(autoencoder=AE.to_dict(), autoencoder_sha256="a" * 64, scale_factor=0.5, lpips_sha256="")
    assert Record.from_dict(saved.to_dict()) == saved
    assert saved.differences(saved) == []
    assert Record(**{**saved.to_dict(), "autoencoder_sha256": "b" * 64}).differences(saved) == [
        "record.autoencoder_sha256"]
    assert Record(**{**saved.to_dict(), "scale_factor": 0.4}).differences(saved) == ["record.scale_factor"]
    # A digest the saved run did not record is not compared.
    assert saved.differences(Record(**{**saved.to_dict(), "autoencoder_sha256": ""})) == []
    with pytest.raises(ValueError, match="a run record has the fields"):
        Record.from_dict({"scale": 1.0})


def test_an_old_latent_run_compares_its_estimated_scale_as_its_record():
    # Its config held the estimated scale; the config as asked for says 0 (estimate it).
    old = to_dict(base_config("cross_attention_unet"))
    old["latent"].update(autoencoder="ae", scale_factor=0.37, autoencoder_spec=json.dumps(AE.to_dict()))
    given = base_config("cross_attention_unet")
    given.latent.autoencoder = "ae"
    assert config_differences(old, given) == []
    given.training.lr = 1.0
    assert config_differences(old, given) == ["training.lr"]


def test_a_run_from_before_records_that_never_checkpointed_reads_its_config_as_its_record(tmp_path):
    old = to_dict(autoencoder_config())
    old["loss"]["lpips_sha256"] = "cd" * 32
    assert loop._saved_record(str(tmp_path), old) == Record(lpips_sha256="cd" * 32)
    (tmp_path / RECORD_FILE).write_text(json.dumps(Record(lpips_sha256="ef" * 32).to_dict()))
    assert loop._saved_record(str(tmp_path), old) == Record(lpips_sha256="ef" * 32)


def test_an_autoencoder_workdir_without_an_exported_model_is_named_as_such(tmp_path):
    (tmp_path / "ae_run" / "checkpoints").mkdir(parents=True)
    config = base_config("cross_attention_unet")
    config.latent.autoencoder = str(tmp_path / "ae_run")
    with pytest.raises(FileNotFoundError, match="training workdir .* has no exported model") as e:
        latent.resolve(config, None)
    assert "\n" not in str(e.value)
