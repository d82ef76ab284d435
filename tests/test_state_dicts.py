"""Reading weights files (ddim_jax.state_dicts): the formats, one-line errors, and no model imports."""

import json
import subprocess
import sys

import numpy as np
import pytest

from ddim_jax.state_dicts import ConversionError, read_state_dict


def test_an_npz_state_dict_is_read_without_torch(tmp_path, monkeypatch):
    arrays = {"conv.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "module.x": np.ones(2, np.int64)}
    np.savez(tmp_path / "w.npz", **arrays)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    sd, note = read_state_dict(tmp_path / "w.npz")
    assert note is None and sorted(sd) == sorted(arrays)
    for k, v in arrays.items():
        np.testing.assert_array_equal(sd[k], v)
        assert sd[k].dtype == v.dtype


@pytest.mark.parametrize("content", ["corrupt", "pickled"])
def test_an_unreadable_npz_is_one_line_naming_it(tmp_path, content):
    path = tmp_path / "w.npz"
    if content == "corrupt":
        path.write_bytes(b"PK\x03\x04 not a zip")
    else:
        np.savez(path, a=np.array([{"code": 1}], dtype=object))  # reading it would need pickle
    with pytest.raises(ConversionError, match=f"cannot read {path} as an .npz") as e:
        read_state_dict(path)
    assert "\n" not in str(e.value)


def test_reading_weights_imports_no_model_code():
    """LPIPS reads its weights with ddim_jax.state_dicts, which imports nothing of the models or converters."""
    code = ("import json, sys, ddim_jax.lpips; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('ddim_jax.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = json.loads(out)
    assert "ddim_jax.state_dicts" in loaded
    assert not {"ddim_jax.models", "ddim_jax.convert", "ddim_jax.unet"} & set(loaded), loaded
