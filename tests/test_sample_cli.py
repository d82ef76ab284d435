"""sample.py's hold on its inputs and outputs: one run per --output, no directories left by a failed run,
reference statistics that do not fit refused before sampling."""

import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sample  # noqa: E402  (the command line, driven in-process)


@pytest.fixture
def workdir(tiny_workdir):
    return tiny_workdir  # conftest.py's: configs/tiny.py trained for 2 steps, shared, read-only


def run_cli(*args):
    sample.FLAGS.unparse_flags()
    sample.FLAGS(["sample.py", *args])
    sample.run()


def test_an_output_is_claimed_by_one_run_at_a_time(tmp_path):
    # flock conflicts between two opens of the file, in one process as in two.
    out = tmp_path / "new"
    with sample.claim_output(str(out)):
        with pytest.raises(FileExistsError, match=f"^--output {out} is being written by pid ") as e:
            with sample.claim_output(str(out)):
                pass
        assert "\n" not in str(e.value)
    assert not out.exists()  # created for the claim, removed with it: nothing was written
    with sample.claim_output(str(out)):  # free again
        (out / "kept").write_text("")
    assert sorted(p.name for p in out.iterdir()) == ["kept"]  # the lock file goes, what the run wrote stays


def test_a_second_run_on_a_claimed_output_is_refused_at_once(workdir, tmp_path):
    out = tmp_path / "out"
    with sample.claim_output(str(out)):  # another run, still sampling
        with pytest.raises(FileExistsError, match="is being written by"):
            run_cli(f"--workdir={workdir}", "--num_samples=2", "--batch_size=8", "--steps=2", f"--output={out}")
        assert [p.name for p in out.iterdir()] == [".sample.lock"]


def test_a_failed_run_leaves_no_directory_it_created(workdir, tmp_path):
    args = [f"--workdir={workdir}", "--num_samples=10000000000", "--batch_size=8", "--steps=2"]
    with pytest.raises(ValueError, match="GiB are free"):  # found out after the outputs were claimed
        run_cli(*args, f"--output={tmp_path / 'a' / 'b'}")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "mine").mkdir()
    with pytest.raises(ValueError, match="GiB are free"):
        run_cli(*args, f"--output={tmp_path / 'mine'}")
    assert (tmp_path / "mine").is_dir()  # a directory that was there stays


def test_fid_statistics_that_do_not_fit_are_refused_before_sampling(workdir, tmp_path, monkeypatch, digits_cnn_cache):
    digits_cnn_cache(tmp_path / "cache")  # the digits extractor's CNN, not the user's ~/.cache
    monkeypatch.setenv("DDIM_JAX_CACHE", str(tmp_path / "cache"))
    np.savez(tmp_path / "nan.npz", mu=np.full(64, np.nan), sigma=np.eye(64))
    np.savez(tmp_path / "small.npz", mu=np.zeros(4), sigma=np.eye(4))
    args = [f"--workdir={workdir}", "--mode=fid", "--num_samples=4", "--batch_size=8", "--fid_steps=2",
            "--fid_etas=0", f"--output={tmp_path / 'out'}"]
    with pytest.raises(ValueError, match=f"^{tmp_path / 'nan.npz'}: the statistics are not finite"):
        run_cli(*args, f"--fid_stats={tmp_path / 'nan.npz'}")
    with pytest.raises(ValueError, match=f"^--fid_stats {tmp_path / 'small.npz'} holds 4-d statistics; digits_cnn "
                                         "features are 64-d"):
        run_cli(*args, f"--fid_stats={tmp_path / 'small.npz'}")
    assert not (tmp_path / "out").exists()


def test_a_bad_feature_extractor_is_refused_before_the_model_loads(tmp_path):
    with pytest.raises(ValueError, match="^--features must be inception or digits; got 'clip'$"):
        run_cli(f"--workdir={tmp_path / 'absent'}", "--mode=fid", "--features=clip")
