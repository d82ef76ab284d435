"""Model directories that are not what they claim: each is refused by models.load in one line naming
what is wrong, never read as some other model."""

import json

import jax
import numpy as np
import pytest
from helpers import leaves, random_params, train
from safetensors.numpy import load_file, save_file

from ddim_jax import loading, models

SPEC = models.ModelSpec("unet", dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                                     norm_groups=4), 8, 1, {"name": "cosine", "num_timesteps": 10})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "model"
    models.save(str(path), SPEC, random_params(SPEC.param_shapes()))
    return path


def _edited(saved, tmp_path, edit):
    """A copy of the saved model with spec.json's document edited by ``edit(doc)``."""
    out = tmp_path / "edited"
    out.mkdir()
    (out / models.PARAMS_FILE).write_bytes((saved / models.PARAMS_FILE).read_bytes())
    doc = json.loads((saved / models.SPEC_FILE).read_text())
    edit(doc)
    (out / models.SPEC_FILE).write_text(json.dumps(doc))
    return out


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(version=0), "has format version 0; this ddim_jax reads versions 1 to 1"),
    (lambda d: d.update(version=True), "has format version True"),
    (lambda d: d["spec"]["schedule"].update(num_timesteps=10 ** 12), r"num_timesteps must be an integer in \[1, 100000\]"),
    (lambda d: d["spec"]["schedule"].update(num_timesteps=1e12), "num_timesteps must be an integer"),
    (lambda d: d["spec"]["arch"].update(ch_mult=[]), "unet argument ch_mult must be a non-empty tuple"),
    (lambda d: d["spec"].update(info="x"), "info must be a mapping"),
    (lambda d: d["spec"].update(arch=[1]), "arch must be a mapping"),
])
def test_a_bad_spec_file_is_refused_in_one_line(saved, tmp_path, edit, message):
    with pytest.raises(ValueError, match=message) as e:
        models.load(_edited(saved, tmp_path, edit))
    assert "\n" not in str(e.value)


def test_integer_parameters_are_refused_not_cast(saved, tmp_path):
    out = _edited(saved, tmp_path, lambda d: None)
    flat = load_file(str(saved / models.PARAMS_FILE))
    name = sorted(flat)[0]
    flat[name] = flat[name].astype(np.int32)
    save_file(flat, str(out / models.PARAMS_FILE))
    with pytest.raises(ValueError, match=f"parameter {name} is int32; parameters are floating point"):
        models.load(out)
    assert models.load(saved)[0] == SPEC  # the untouched copy still loads


def test_a_corrupt_export_falls_back_to_the_workdirs_checkpoint(tmp_path, caplog):
    train(tmp_path, num_steps=4, devices=jax.devices()[:1])
    spec, params = loading.load(tmp_path)
    want = leaves(params)
    export = tmp_path / models.EXPORT_DIR / models.PARAMS_FILE
    export.write_bytes(export.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match="cannot read"):
        models.load(tmp_path / models.EXPORT_DIR)
    with caplog.at_level("WARNING"):
        spec2, params2 = loading.load(tmp_path)  # the checkpoint of the same step holds the same EMA params
    assert "reading the newest checkpoint instead" in caplog.text and spec2.info["step"] == 4
    for a, b in zip(leaves(params2), want):
        np.testing.assert_array_equal(a, b)


def test_the_old_converted_layout_is_named_not_taken_for_a_workdir(tmp_path):
    (tmp_path / "params").mkdir()
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="old converted-checkpoint layout; convert the source again"):
        loading.load(tmp_path)
