"""Training when things go wrong: a checkpoint that cannot be written, a full disk, corrupted or
truncated checkpoint files, Ctrl-C and SIGTERM, a damaged metrics file, a class count that does not
match the data, and the leftovers of killed runs. Subprocesses only where the process boundary is the
point (the exit, what the terminal shows); signals are raised in this process, at the handlers the
training loop installs."""

import errno
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from helpers import ROOT, metric_steps, tiny_config, train

from ddim_jax import loading, models, training
from ddim_jax.training import checkpoints as ckpt_lib
from ddim_jax.training import loop as loop_lib
from ddim_jax.training import metrics as metrics_lib


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


def test_a_checkpoint_directory_that_cannot_be_made_stops_the_run_with_one_line(tmp_path, capfd):
    # In this process: train.py prints such an error as "error: <its one line>" (the full disk's test shows that
    # on the command line); what would keep train.py from exiting after it is a thread left running, seen here.
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "checkpoints").write_text("x")  # where the checkpoints' directory should be
    running = {t for t in threading.enumerate() if not t.daemon}
    t0 = time.time()
    with pytest.raises(OSError) as e:
        train(workdir, num_steps=4)
    assert "checkpoints" in str(e.value) and "\n" not in str(e.value), str(e.value)
    deadline = time.time() + 10  # (a thread that is ending gets a moment)
    while (left := [t for t in threading.enumerate() if not t.daemon and t not in running and t.is_alive()]) \
            and time.time() < deadline:
        time.sleep(0.1)
    assert not left, f"threads still running after the failed save: {[t.name for t in left]}"
    assert time.time() - t0 < 150, "the failed save kept the run from stopping"
    assert "Traceback" not in "".join(capfd.readouterr())  # nor did a thread print one
    assert (workdir / "checkpoints").read_text() == "x" and not (workdir / "model").exists()


# The disk fills during the first save: files may not grow past 64 KiB (the checkpoint's arrays do). The limit
# is set in a small Python that then execs the command (a limit survives exec; Python ignores SIGXFSZ, so a write
# past it fails with EFBIG), not in a preexec_fn, which would fork this multithreaded process.
_FULL_DISK = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10)); "
              "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")


def test_a_disk_that_fills_during_a_save_gives_one_line_and_leaves_a_workdir_that_resumes(tmp_path):
    workdir = tmp_path / "run"
    # The session's compilation cache is read but not written (its entries are larger than the files may grow).
    env = dict(_env(), JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=str(1 << 62))
    cmd = _command(workdir, "--config.training.num_steps=1")  # its one step's checkpoint is the save that fails
    proc = subprocess.run([cmd[0], "-c", _FULL_DISK, *cmd[1:]], cwd=tmp_path, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=150)
    assert proc.returncode != 0
    _assert_one_error_line(proc.stdout, "File too large")
    assert not (workdir / "model").exists()  # nothing was exported from a checkpoint that never committed
    assert ckpt_lib.step_dirs(str(workdir)) == []
    assert train(workdir, num_steps=2).steps_run == 2  # the next run starts, from step 0
    # and removes what the failed save of step 1 wrote (writes still in flight may outlive the failing run's cleanup)
    assert os.listdir(workdir / "checkpoints") == ["2"]


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


@pytest.mark.parametrize("sig,word", [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "preempted")],
                         ids=["ctrl_c", "sigterm"])
def test_ctrl_c_and_sigterm_save_a_checkpoint_after_the_current_step_and_stop_cleanly(tmp_path, monkeypatch, capsys,
                                                                                       caplog, sig, word):
    # The signal is raised in this process while it trains (from the metrics row of step 3, in the main thread),
    # so it reaches the handlers the loop installed, as a Ctrl-C or a preemption would.
    handlers = []
    real_write = metrics_lib.MetricsWriter.write

    def write(self, row):
        real_write(self, row)
        if row["step"] == 3:
            handlers.append(signal.getsignal(sig))
            assert isinstance(handlers[-1], loop_lib._Stop), handlers  # the loop's, before the signal is sent
            signal.raise_signal(sig)

    monkeypatch.setattr(metrics_lib.MetricsWriter, "write", write)
    before = signal.getsignal(sig)
    with caplog.at_level(logging.WARNING, logger="ddim_jax"):
        result = train(tmp_path, num_steps=1000, checkpoint_every=1000, log_every=1)  # returns: train.py exits 0
    assert len(handlers) == 1 and signal.getsignal(sig) is before  # the loop's handler is gone again
    assert result.preempted and result.steps_run == 3 and int(result.state.step) == 3
    assert ckpt_lib.step_dirs(str(tmp_path)) == [3]  # saved after the current step, not at checkpoint_every
    assert loading.load(str(tmp_path))[0].info["step"] == 3  # the export is as new as the checkpoint
    assert metric_steps(tmp_path) == [1, 2, 3]
    warned = [r.getMessage() for r in caplog.records if "received" in r.getMessage()]
    assert warned == [f"received {signal.Signals(sig).name}: saving a checkpoint and exiting"
                      + (" (Ctrl-C again to stop at once, without it)" if sig == signal.SIGINT else "")], warned
    out = capsys.readouterr().out
    assert "Traceback" not in out and out.strip().splitlines()[-1].startswith(f"{word}: step 3 (3 this run)"), out


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


def test_asyncio_reports_of_a_failed_saves_unawaited_writes_are_dropped_and_other_errors_pass():
    """A failed save leaves tensorstore writes whose errors were set on their futures by the C++ library
    (never raised in Python, so without a traceback) and never awaited: asyncio reports each one. Those
    reports are dropped; an error raised in Python, or logged by another logger, still shows."""
    echoes = ckpt_lib._OrbaxEchoes()

    def record(logger, exc):
        return logging.LogRecord(logger, logging.ERROR, "base_events.py", 1, "Future exception was never retrieved",
                                 None, (type(exc), exc, exc.__traceback__))

    unawaited = ValueError("OUT_OF_RANGE: Error writing \"params.kernel/0\" in OCDBT database: File too large")
    try:
        raise ValueError("raised in Python")
    except ValueError as e:
        raised = e
    assert not echoes.filter(record("asyncio", unawaited))
    assert echoes.filter(record("asyncio", raised)) and echoes.filter(record("absl", unawaited))


def test_the_tensorboard_writer_loads_without_importing_torch(monkeypatch, tmp_path):
    # tensorboardX imports torch where it is installed (2 CPU-seconds of every run's start), only to accept
    # torch tensors; the run's writer loads it with torch hidden, and unhides it.
    for name in [m for m in sys.modules if m == "torch" or m.split(".")[0] == "tensorboardX"]:
        monkeypatch.delitem(sys.modules, name)
    writer = metrics_lib.MetricsWriter(str(tmp_path), start_step=0, total_steps=3, enabled=True, progress=False)
    assert "torch" not in sys.modules  # (not left hidden either: a hidden module is None there)
    writer.write({"step": 3, "loss": 0.25, "steps_per_sec": 1.0})
    writer.close()
    assert [b"loss" in p.read_bytes() for p in (tmp_path / "tensorboard").iterdir()] == [True]
