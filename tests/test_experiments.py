"""sample.py and ddim_jax.experiments on a tiny trained run."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from ddim_jax import experiments as ex
from ddim_jax import training
from ddim_jax.checkpoint_io import save_converted
from ddim_jax.unet import init_params

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    sys.path.insert(0, str(ROOT))
    try:
        from configs.tiny import get_config
    finally:
        sys.path.remove(str(ROOT))
    c = get_config()
    c.training.num_steps = 2
    c.training.checkpoint_every = 2
    path = tmp_path_factory.mktemp("run")
    training.train(c, str(path), progress=False)
    return str(path)


def run_cli(*args, devices=1):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=300)


def test_generate_gives_exactly_n_samples_and_is_reproducible(workdir):
    model = ex.load_model(workdir)
    a = ex.generate(model, 11, 4, 5, seed=3, progress=False)
    assert a.shape == (11, 8, 8, 1) and a.dtype == np.uint8
    b = ex.generate(model, 11, 8, 5, seed=3, progress=False)  # another batch size: same latents, same images
    np.testing.assert_array_equal(a, b)
    c = ex.generate(model, 11, 4, 5, seed=4, progress=False)
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="number of samples must be >= 1"):
        ex.generate(model, 0, 4, 5)


def test_same_seed_same_images_on_four_devices(workdir, tmp_path):
    out = run_cli(f"--workdir={workdir}", "--num_samples=10", "--batch_size=4", "--steps=5", "--eta=0.5",
                  f"--output={tmp_path / 'four'}", devices=4)
    assert out.returncode == 0, out.stderr[-3000:]
    four = np.load(tmp_path / "four" / "samples.npz")["images"]
    model = ex.load_model(workdir)
    one = ex.generate(model, 10, 4, 5, eta=0.5, seed=0, progress=False)
    assert four.shape == (10, 8, 8, 1)
    np.testing.assert_array_equal(four, one)
    assert (tmp_path / "four" / "samples.png").exists()


def test_paper_experiments_shapes(workdir):
    model = ex.load_model(workdir)
    rows = ex.consistency(model, 3, [2, 5])
    assert rows.shape == (2, 3, 8, 8, 1)
    grid = ex.interpolation(model, 2, 5, 4)
    assert grid.shape == (2, 5, 8, 8, 1)
    seq = ex.sequence(model, 2, 6, columns=3)
    assert seq.shape == (2, 4, 8, 8, 1)
    np.testing.assert_array_equal(seq[:, -1], ex.consistency(model, 2, [6])[0])  # last column: the sample
    images = ex._gather(ex.latents(model, 0, 6, 0))  # arbitrary inputs; only shapes and the metric matter here
    images = ((np.clip(images, -1, 1) + 1) * 127.5).astype(np.uint8)
    errors, recons = ex.reconstruction(model, images, [3, 10], 4, progress=False)
    assert set(errors) == {3, 10} and recons[3].shape == images.shape
    assert all(0 <= e < 1 for e in errors.values())


def test_fid_mode_writes_a_table_and_a_plot(workdir, tmp_path):
    out = run_cli(f"--workdir={workdir}", "--mode=fid", "--num_samples=40", "--batch_size=8",
                  "--fid_steps=2,5", "--fid_etas=0,sigma_hat", f"--output={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "fid.json").read_text())
    assert result["features"] == "digits_cnn"
    assert {(r["eta"], r["steps"]) for r in result["rows"]} == {("0", 2), ("0", 5), ("sigma_hat", 2), ("sigma_hat", 5)}
    assert all(np.isfinite(r["fid"]) and r["fid"] > 0 for r in result["rows"])
    assert (tmp_path / "fid.png").stat().st_size > 0 and "| eta \\ S | 2 | 5 |" in (tmp_path / "fid.md").read_text()


def test_converted_checkpoints_load_for_sampling(tmp_path):
    from ddim_jax.unet import UNet

    kw = dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    params = init_params(UNet(**kw), jax.random.key(0), 8, 3)
    cfg = {"model": kw, "diffusion": {"schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                                      "num_timesteps": 50}, "image_size": 8, "channels": 3}
    save_converted(tmp_path / "ckpt", cfg, params)
    model = ex.load_model(checkpoint=str(tmp_path / "ckpt"))
    assert model.schedule.num_timesteps == 50
    assert ex.generate(model, 3, 2, 4, progress=False).shape == (3, 8, 8, 3)
    cfg["model"] = dict(kw, ch=64)  # the architecture in config.json no longer matches the params
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match the UNet in its config.json"):
        ex.load_model(checkpoint=str(tmp_path / "ckpt"))


def test_clear_errors_and_no_silent_overwrite(workdir, tmp_path):
    cases = [
        (["--workdir=/nonexistent/run"], "workdir '/nonexistent/run' does not exist"),
        ([f"--workdir={workdir}", "--mode=dance"], "--mode must be one of"),
        ([f"--workdir={workdir}", "--num_samples=0"], "--num_samples must be >= 1"),
        ([f"--workdir={workdir}", "--steps=101"], r"--steps must be in \[1, 100\]"),
        ([f"--workdir={workdir}", "--eta=-1"], "eta must be a number >= 0 or 'sigma_hat'"),
        ([f"--workdir={workdir}", "--spacing=cubic"], "--spacing must be one of"),
        ([f"--workdir={workdir}", "--batch_size=0"], "batch_size must be a positive multiple"),
    ]
    for args, match in cases:
        extra = [] if any(a.startswith("--num_samples") for a in args) else ["--num_samples=2"]
        out = run_cli(*args, *extra, f"--output={tmp_path / 'x'}")
        assert out.returncode != 0 and re.search(match, out.stderr), (args, out.stderr[-500:])
    first = run_cli(f"--workdir={workdir}", "--num_samples=2", "--batch_size=2", "--steps=2", f"--output={tmp_path / 'o'}")
    assert first.returncode == 0, first.stderr[-2000:]
    before = (tmp_path / "o" / "samples.npz").read_bytes()
    again = run_cli(f"--workdir={workdir}", "--num_samples=2", "--batch_size=2", "--steps=2", "--seed=5",
                    f"--output={tmp_path / 'o'}")
    assert again.returncode != 0 and "exists" in again.stderr and "--overwrite" in again.stderr
    assert (tmp_path / "o" / "samples.npz").read_bytes() == before


def test_a_checkpoint_whose_architecture_differs_from_its_config(workdir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(workdir, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model"]["ch"] = 64
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match the architecture in its config.json"):
        ex.load_model(str(broken))
