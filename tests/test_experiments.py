"""sample.py and ddim_jax.experiments on a tiny trained run, in this process (8 CPU devices)."""

import dataclasses
import json
import os
import pathlib
import shutil
import sys

import jax
import numpy as np
import pytest

import ddim_jax as dj
from ddim_jax import experiments as ex
from ddim_jax import loading, models

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sample  # noqa: E402  (the command line, driven in-process)


@pytest.fixture
def workdir(tiny_workdir):
    return tiny_workdir  # conftest.py's: configs/tiny.py trained for 2 steps, shared, read-only


def run_cli(*args):
    """sample.py with these flags, in this process."""
    sample.FLAGS.unparse_flags()
    sample.FLAGS(["sample.py", *args])
    sample.run()


def test_generate_gives_exactly_n_samples_and_is_reproducible(workdir):
    model = loading.load_model(workdir)
    a = ex.generate(model, 11, 8, 5, seed=3, progress=False)
    assert a.shape == (11, 8, 8, 1) and a.dtype == np.uint8
    b = ex.generate(model, 11, 16, 5, seed=3, progress=False)  # another batch size: same latents, same images
    np.testing.assert_array_equal(a, b)
    c = ex.generate(model, 11, 8, 5, seed=4, progress=False)
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="number of samples must be >= 1"):
        ex.generate(model, 0, 8, 5)
    with pytest.raises(ValueError, match=r"batch_size must be a positive multiple of the number of devices \(8\)"):
        ex.generate(model, 4, 4, 5)


def test_same_seed_same_images_on_one_and_four_devices(workdir, tmp_path):
    four = loading.load_model(workdir, devices=jax.devices()[:4])
    one = loading.load_model(workdir, devices=jax.devices()[:1])
    np.testing.assert_array_equal(ex.generate(four, 10, 4, 5, eta=0.5, seed=0, progress=False),
                                  ex.generate(one, 10, 4, 5, eta=0.5, seed=0, progress=False))


def test_sample_mode_streams_exactly_n_samples_to_npy(workdir, tmp_path):
    run_cli(f"--workdir={workdir}", "--num_samples=10", "--batch_size=8", "--steps=5", "--eta=0.5",
            f"--output={tmp_path}")
    got = np.load(tmp_path / "samples.npy")
    want = ex.generate(loading.load_model(workdir), 10, 8, 5, eta=0.5, seed=0, progress=False)
    np.testing.assert_array_equal(got, want)
    assert (tmp_path / "samples.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npy", "samples.png"]  # no temporary files


def test_paper_experiments_shapes(workdir):
    model = loading.load_model(workdir)
    rows = ex.consistency(model, 3, [2, 3])
    assert rows.shape == (2, 3, 8, 8, 1)
    grid = ex.interpolation(model, 2, 5, 3)
    assert grid.shape == (2, 5, 8, 8, 1)
    seq = ex.sequence(model, 2, 3, columns=3)
    assert seq.shape == (2, 4, 8, 8, 1)
    np.testing.assert_array_equal(seq[:, -1], rows[1, :2])  # last column: the sample
    images = ex.generate(model, 6, 8, 3, progress=False)  # arbitrary inputs; only shapes and the metric matter
    errors, recons = ex.reconstruction(model, images, [2, 3], 8, progress=False)
    assert set(errors) == {2, 3} and recons[3].shape == images.shape
    assert all(0 <= e < 1 for e in errors.values())


@pytest.mark.parametrize("mode,flags,rows,cols", [
    ("consistency", ["--steps_list=2,3"], 2, 3),  # one row per S, one column per sample
    ("interpolation", ["--steps=3"], 1, 11),  # one row per pair, 11 points
    ("sequence", ["--steps=3"], 3, 4),  # one row per sample: x0 at 3 steps, then the sample
])
def test_grid_modes_write_their_grids(workdir, tmp_path, mode, flags, rows, cols):
    from PIL import Image

    run_cli(f"--workdir={workdir}", f"--mode={mode}", "--num_samples=3", *flags, f"--output={tmp_path}")
    w, h = Image.open(tmp_path / f"{mode}.png").size
    scale = 64 // 8  # 8x8 digits are drawn 8x larger, with a 1-pixel border around each
    assert (h, w) == (rows * 9 * scale + scale, cols * 9 * scale + scale)


def test_fid_mode_writes_a_table_and_a_plot(workdir, tmp_path, tmp_path_factory, monkeypatch, digits_cnn_cache):
    monkeypatch.setenv("DDIM_JAX_CACHE", str(digits_cnn_cache(tmp_path_factory.mktemp("cache"))))  # with the CNN
    run_cli(f"--workdir={workdir}", "--mode=fid", "--num_samples=40", "--batch_size=8",
            "--fid_steps=2,5", "--fid_etas=0,sigma_hat", "--fid_solvers=ddim,dpmpp_2m", f"--output={tmp_path}")
    result = json.loads((tmp_path / "fid.json").read_text())
    assert result["features"] == "digits_cnn"
    assert {(r["sampler"], r["steps"]) for r in result["rows"]} == {
        (sampler, s) for sampler in ("eta=0", "sigma_hat", "dpmpp_2m") for s in (2, 5)}
    assert all(np.isfinite(r["fid"]) and r["fid"] > 0 for r in result["rows"])
    table = (tmp_path / "fid.md").read_text()
    assert (tmp_path / "fid.png").stat().st_size > 0 and "| sampler \\ S | 2 | 5 |" in table and "| dpmpp_2m |" in table
    assert {(r["solver"], r["spacing"]) for r in result["rows"]} == {("ddim", "uniform"), ("dpmpp_2m", "exponential")}
    assert "each solver's default spacing" in table


@pytest.mark.parametrize("args,name", [
    ([], "sample"), (["--solver=dpmpp_2m"], "sample_dpmpp_2m"),
    (["--solver=dpmpp_2m", "--spacing=exponential"], "sample_dpmpp_2m"),  # its default: not named
    (["--solver=dpmpp_2m", "--spacing=uniform"], "sample_dpmpp_2m_uniform"),
    (["--spacing=quadratic"], "sample_quadratic"), (["--mode=fid", "--spacing=uniform"], "fid_uniform"),
    (["--dtype=bfloat16"], "sample_bfloat16")])
def test_output_names_say_the_settings_that_are_not_defaults(args, name):
    sample.FLAGS.unparse_flags()
    sample.FLAGS(["sample.py", "--workdir=runs/x", *args])
    settings = sample.Settings.from_flags()
    assert settings.output_name == name and settings.out == os.path.join("runs/x", name)


def test_reference_statistics_are_named_by_everything_that_changes_the_images():
    base = {"dataset": "cifar10", "folder": "", "image_size": 32, "channels": 3, "crop": "none"}
    names = {sample.reference_name(dict(base, **change)) for change in [
        {}, {"image_size": 64}, {"crop": "center"}, {"channels": 1}, {"dataset": "celeb_a"},
        {"dataset": "folder", "folder": "/data/a"}, {"dataset": "folder", "folder": "/data/b"},
        {"classes": [0, 1]}, {"classes": [0, 2]}, {"classes": None}]}
    assert len(names) == 9  # (classes None is the default's name)
    assert sample.reference_name({"dataset": "digits"}) == "digits-train"  # the digits cache keeps its name
    assert sample.reference_name({"dataset": "digits", "classes": [0, 1, 2, 3, 4]}) == "digits-train-classes0_1_2_3_4"
    assert sample.reference_name({"dataset": "digits", "image_size": 32}) == "digits-train-32px"  # upscaled


def test_sample_mode_with_a_higher_order_solver(workdir, tmp_path):
    run_cli(f"--workdir={workdir}", "--num_samples=8", "--batch_size=8", "--steps=4", "--solver=dpmpp_2m",
            f"--output={tmp_path}")
    model = loading.load_model(workdir)
    got = np.load(tmp_path / "samples.npy")
    np.testing.assert_array_equal(got, ex.generate(model, 8, 8, 4, solver="dpmpp_2m", progress=False))
    # The solver really is DPM-Solver++: the library's sampler gives the same arrays, DDIM other ones (a
    # 2-step model's x0 predictions barely move between steps, so the difference is small and its uint8
    # images may be DDIM's).
    x_T = ex.latents(model, 0, 8, 0)
    ours = np.asarray(ex.decode(model, x_T, 4, solver="dpmpp_2m"))
    np.testing.assert_array_equal(ours, np.asarray(dj.sample(model.eps_fn, model.schedule, x_T, 4, solver="dpmpp_2m",
                                                             clip_x0=1.0)))
    assert np.abs(ours - np.asarray(ex.decode(model, x_T, 4))).max() > 0
    # The stochastic solver gets its noise key in every mode, from the seed.
    sde = ex.consistency(model, 2, [3], solver="dpmpp_2m_sde")
    np.testing.assert_array_equal(sde, ex.consistency(model, 2, [3], solver="dpmpp_2m_sde"))


def test_model_directories_load_for_sampling_and_refuse_mismatched_params(workdir, tmp_path):
    trained, params = loading.load(workdir)
    spec = dataclasses.replace(trained, schedule={"name": "linear", "num_timesteps": 50}, info={"note": "x"})
    models.save(str(tmp_path / "m"), spec, params)
    model = loading.load_model(str(tmp_path / "m"))
    assert model.spec == spec and model.schedule.num_timesteps == 50 and model.spec.info == {"note": "x"}
    assert ex.generate(model, 3, 8, 4, progress=False).shape == (3, 8, 8, 1)
    doc = json.loads((tmp_path / "m" / "spec.json").read_text())
    doc["spec"]["arch"]["ch"] = 64  # the spec no longer matches the params
    (tmp_path / "m" / "spec.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"parameter conv_in/bias has shape \(32,\); the spec's unet needs \(64,\)"):
        loading.load(str(tmp_path / "m"))
    with pytest.raises(FileExistsError):  # an existing model directory is kept ...
        models.save(str(tmp_path / "m"), spec, params)
    (tmp_path / "m" / "notes.txt").write_text("mine")  # ... never replaced while it holds other files ...
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        models.save(str(tmp_path / "m"), spec, params, overwrite=True)
    (tmp_path / "m" / "notes.txt").unlink()
    bad = jax.tree.map(lambda a: a * np.nan, params)
    with pytest.raises(FloatingPointError, match="non-finite"):  # ... and never replaced by NaNs
        models.save(str(tmp_path / "m"), spec, bad, overwrite=True)
    assert json.loads((tmp_path / "m" / "spec.json").read_text())["spec"]["arch"]["ch"] == 64


@pytest.mark.parametrize("args,error,match", [
    (["--workdir=/nonexistent/run"], FileNotFoundError, "/nonexistent/run does not exist"),
    (["--mode=dance"], ValueError, "--mode must be one of sample, consistency"),
    (["--num_samples=0"], ValueError, "--num_samples must be >= 1"),
    (["--steps=101"], ValueError, r"--steps must be in \[1, 100\]"),
    (["--eta=-1"], ValueError, "eta must be a finite number >= 0 or 'sigma_hat'"),
    (["--eta=inf"], ValueError, "eta must be a finite number >= 0 or 'sigma_hat'"),
    (["--eta=nan"], ValueError, "eta must be a finite number >= 0 or 'sigma_hat'"),
    (["--spacing=cubic"], ValueError, "--spacing must be one of"),
    (["--dtype=float16"], ValueError, "--dtype must be one of float32, bfloat16; got 'float16'"),
    (["--batch_size=0"], ValueError, "--batch_size must be >= 1"),
    (["--batch_size=12"], ValueError, r"batch_size must be a positive multiple of the number of devices \(8\)"),
    (["--batch_size=8000000000"], ValueError, r"batch_size=8000000000 needs about .* GiB"),
    (["--num_samples=10000000000"], ValueError, r"--num_samples=10000000000 needs .* GiB in .*; .* GiB are free"),
    (["--step=1"], FileNotFoundError, r"no checkpoint for step 1 .* \(have: \[2\]\)"),
    (["--solver=euler"], ValueError, "--solver must be among ddim, dpmpp_2m, dpmpp_3m"),
    (["--fid_solvers=ddim,heun"], ValueError, "--fid_solvers must be among ddim, dpmpp_2m, dpmpp_3m"),
    (["--solver=dpmpp_2m", "--eta=1"], ValueError, "--eta applies to --solver=ddim only"),
    (["--solver=dpmpp_3m", "--mode=sequence"], ValueError, "--mode=sequence uses DDIM"),
])
def test_clear_errors(workdir, tmp_path, args, error, match):
    base = [] if any(a.startswith("--workdir") for a in args) else [f"--workdir={workdir}"]
    extra = [] if any(a.startswith("--num_samples") for a in args) else ["--num_samples=2"]
    with pytest.raises(error, match=match):
        run_cli(*base, *args, *extra, "--steps=2" if "--steps=101" not in args else "--seed=0",
                f"--output={tmp_path / 'x'}")
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_os_errors_are_one_line_exits(workdir, tmp_path):
    (tmp_path / "file").write_text("")
    sample.FLAGS.unparse_flags()
    sample.FLAGS(["sample.py", f"--workdir={workdir}", "--num_samples=2", "--steps=2",
                  f"--output={tmp_path / 'file' / 'out'}"])
    with pytest.raises(SystemExit, match=r"^error: \[Errno 20\] Not a directory"):
        sample.main(["sample.py"])


def test_no_silent_overwrite_and_atomic_replacement(workdir, tmp_path):
    args = [f"--workdir={workdir}", "--num_samples=2", "--batch_size=8", "--steps=2", f"--output={tmp_path}"]
    run_cli(*args)
    before = (tmp_path / "samples.npy").read_bytes()
    with pytest.raises(FileExistsError, match="exists .* pass --overwrite"):
        run_cli(*args, "--seed=5")
    assert (tmp_path / "samples.npy").read_bytes() == before
    run_cli(*args, "--seed=5", "--overwrite")
    assert (tmp_path / "samples.npy").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npy", "samples.png"]


def test_outputs_for_a_model_directory_go_beside_it(workdir, tmp_path):
    shutil.copytree(pathlib.Path(workdir) / "model", tmp_path / "m")
    run_cli(f"--checkpoint={tmp_path / 'm'}", "--num_samples=2", "--batch_size=8", "--steps=2")
    assert (tmp_path / "m_sample" / "samples.npy").exists()
    assert sorted(os.listdir(tmp_path / "m")) == ["params.safetensors", "spec.json"]


def test_a_workdir_loads_from_its_checkpoints_alone(workdir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    exported = loading.load(str(copy))
    shutil.rmtree(copy / "model")
    (copy / "config.json").unlink()  # each checkpoint carries its own config
    spec, params = loading.load(str(copy))
    assert spec == exported[0] and spec.info["step"] == 2
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(exported[1])):
        np.testing.assert_array_equal(a, b)
