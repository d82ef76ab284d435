"""Training when things go wrong: a checkpoint that cannot be written, a full disk, corrupted or
truncated checkpoint files, Ctrl-C, a damaged metrics file, a class count that does not match the
data, and the leftovers of killed runs. Subprocesses only where the process boundary is the point
(the exit, what the terminal shows, a signal)."""

import errno
import logging
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT, metric_steps, tiny_config, train

from ddim_jax import loading, models, training
from ddim_jax.training import checkpoints as ckpt_lib


def _command(workdir, *flags):
    return [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs' / 'tiny.py'}", f"--workdir={workdir}",
            *flags]


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu")


def _assert_one_error_line(out: str, match: str):
    """What the terminal shows of a failed run: the progress bar, then one line naming the error."""
    for noise in ("Traceback", "Event loop is closed", "ERROR:", "exception was never retrieved"):
        assert noise not in out, out[-3000:]
    lines = out.strip().splitlines()
    assert lines[-1].startswith("error: ") and match in lines[-1], out[-3000:]
    assert out.count("error: ") == 1, out[-3000:]


def _largest_file(directory):
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_a_checkpoint_directory_that_cannot_be_made_stops_the_run_with_one_line(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "checkpoints").write_text("x")  # where the checkpoints' directory should be
    try:
        out = subprocess.run(_command(workdir, "--config.training.num_steps=4"), cwd=tmp_path, env=_env(), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=150).stdout
    except subprocess.TimeoutExpired:
        pytest.fail("train.py did not exit after its checkpoint could not be written")
    _assert_one_error_line(out, "checkpoints")
    assert (workdir / "checkpoints").read_text() == "x" and not (workdir / "model").exists()


def _full_disk():
    """The disk fills during the first save: files may not grow past 64 KiB (the checkpoint's arrays do)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))


def test_a_disk_that_fills_during_a_save_gives_one_line_and_leaves_a_workdir_that_resumes(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.run(_command(workdir, "--config.training.num_steps=4", "--compile_cache="), cwd=tmp_path,
                          env=_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=150,
                          preexec_fn=_full_disk)
    assert proc.returncode != 0
    _assert_one_error_line(proc.stdout, "File too large")
    assert not (workdir / "model").exists()  # nothing was exported from a checkpoint that never committed
    assert ckpt_lib.step_dirs(str(workdir)) == []
    assert train(workdir, num_steps=4).steps_run == 4  # the next run starts, from step 0
    # and removes what the failed save wrote (writes still in flight may outlive the failing run's cleanup)
    assert os.listdir(workdir / "checkpoints") == ["4"]


def test_the_model_is_exported_only_after_its_checkpoint_has_committed(tmp_path, monkeypatch):
    committed = []

    def record(path, spec, params, **kw):
        committed.append(spec.info["step"] in ckpt_lib.step_dirs(str(tmp_path)))
        return real_save(path, spec, params, **kw)

    real_save = models.save
    monkeypatch.setattr(models, "save", record)
    train(tmp_path, num_steps=4, checkpoint_every=2, log_every=2, keep_checkpoints=2)
    assert committed == [True, True]

    # A save that fails in the background (a full disk): no model is exported, and the next run starts.
    monkeypatch.setattr(models, "save", real_save)

    def failing(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_lib.ocp.CheckpointManager, "save", lambda self, step, **kw: True)
    monkeypatch.setattr(ckpt_lib.ocp.CheckpointManager, "wait_until_finished", failing)
    with pytest.raises(OSError, match="No space left"):
        train(tmp_path / "full", num_steps=2, checkpoint_every=2)
    assert not (tmp_path / "full" / "model").exists()


def _flip_bytes(path, n=3):
    data = bytearray(path.read_bytes())
    for i in range(n):
        data[len(data) // 2 + 7 * i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped", "truncated", "deleted"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, damage, tiny_run):
    tiny_run(tmp_path, num_steps=4, checkpoint_every=2, keep_checkpoints=2)
    victim = _largest_file(tmp_path / "checkpoints" / "4")
    if damage == "flipped":
        _flip_bytes(victim)
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    else:
        victim.unlink()
    with caplog.at_level(logging.WARNING, logger="ddim_jax"):
        result = train(tmp_path, num_steps=6, checkpoint_every=2, keep_checkpoints=2)
    assert result.steps_run == 4  # from step 2
    warned = [r.getMessage() for r in caplog.records if "checkpoint 4" in r.getMessage()]
    assert warned and all("\n" not in m for m in warned), warned
    assert (tmp_path / "corrupt_checkpoints" / "4").is_dir()


def test_a_checkpoint_without_checksums_still_restores(tmp_path, tiny_run):
    # Checkpoints written before they carried checksums are restored unchecked.
    tiny_run(tmp_path, num_steps=2, checkpoint_every=2)
    sums = tmp_path / "checkpoints" / "2" / ckpt_lib.CHECKSUMS
    assert sums.is_file()
    sums.unlink()
    assert train(tmp_path, num_steps=4, checkpoint_every=2).steps_run == 2
    assert not (tmp_path / "corrupt_checkpoints").exists()


def test_ctrl_c_saves_a_checkpoint_and_exits_with_one_line(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.Popen(_command(workdir, "--config.training.num_steps=100000",
                                     "--config.training.checkpoint_every=1000", "--config.training.log_every=1"),
                            cwd=tmp_path, env=_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0 and "Traceback" not in out, out[-3000:]
    steps = ckpt_lib.step_dirs(str(workdir))
    assert len(steps) == 1 and 3 <= steps[0] < 1000, steps
    assert out.strip().splitlines()[-1].startswith(f"interrupted: step {steps[0]}"), out[-2000:]
    assert loading.load(str(workdir))[0].info["step"] == steps[0]


def test_an_undecodable_metrics_line_is_skipped_with_a_warning_naming_it(tmp_path, caplog, tiny_run):
    tiny_run(tmp_path, num_steps=4, checkpoint_every=2, keep_checkpoints=2)
    path = tmp_path / "metrics.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + b'{"step": \xff}\n' + b"".join(lines[1:]))
    with caplog.at_level(logging.WARNING, logger="ddim_jax"):
        assert train(tmp_path, num_steps=6, checkpoint_every=2, log_every=2).steps_run == 2
    assert any(str(path) in r.getMessage() and "line 2" in r.getMessage() for r in caplog.records), caplog.text
    assert metric_steps(tmp_path) == [2, 4, 6]


@pytest.mark.parametrize("num_classes", [5, 100])
def test_a_class_count_other_than_the_datas_is_refused(tmp_path, num_classes):
    c = tiny_config(num_steps=2)
    c.model.num_classes = num_classes
    with pytest.raises(ValueError, match=rf"model.num_classes={num_classes} but dataset 'digits' has 10 classes"):
        training.train(c, str(tmp_path), progress=False)
    assert not (tmp_path / "config.json").exists()


def test_leftovers_of_killed_runs_are_removed_and_never_taken_for_a_checkpoint_or_model(tmp_path, tiny_run):
    tiny_run(tmp_path, num_steps=2, checkpoint_every=2)
    export_tmp = tmp_path / ".model.k1ll3d.tmp"  # kill -9 during the export
    export_tmp.mkdir()
    (export_tmp / models.SPEC_FILE).write_text("{}")
    save_tmp = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp"  # a save the disk could not hold
    (save_tmp / "state").mkdir(parents=True)
    assert ckpt_lib.step_dirs(str(tmp_path)) == [2] and loading.load(str(tmp_path))[0].info["step"] == 2
    assert train(tmp_path, num_steps=4, checkpoint_every=2).steps_run == 2
    assert not export_tmp.exists() and not save_tmp.exists()
    assert ckpt_lib.step_dirs(str(tmp_path)) == [2, 4] and loading.load(str(tmp_path))[0].info["step"] == 4


@pytest.mark.parametrize("text", ["[]", '{"a": 1}', "not json"])
def test_a_checksum_file_that_is_not_a_map_of_digests_marks_the_checkpoint_corrupt(tmp_path, text):
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), 1)
    try:
        (tmp_path / "checkpoints" / "4").mkdir(parents=True)
        (tmp_path / "checkpoints" / "4" / ckpt_lib.CHECKSUMS).write_text(text)
        with pytest.raises(ckpt_lib.CorruptCheckpoint, match="checkpoint 4: its sha256sums.json"):
            ckpt.verify(4)
    finally:
        ckpt.close()
