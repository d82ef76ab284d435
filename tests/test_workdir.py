"""A workdir that never loses data: failed runs, a second trainer, unreadable checkpoints, kill -9,
non-finite stops, bad configs and command-line errors (SIGTERM and Ctrl-C: test_reliability.py)."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import EXPLODING, ROOT, metric_steps, tiny_config, train

from ddim_jax import files, loading, training
from ddim_jax.config import validate_config
from ddim_jax.training import checkpoints as ckpt_lib


def test_a_failed_run_leaves_config_json_and_checkpoints_as_they_were(tmp_path, tiny_run):
    run = tiny_run(tmp_path / "run", num_steps=2, checkpoint_every=2)
    before = (run / "config.json").read_bytes()
    bad_data = tiny_config(num_steps=4)
    bad_data.data.update(dataset="folder", folder=str(tmp_path / "no_such_folder"))
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        training.train(bad_data, str(run), allow_config_change=True, progress=False)
    with pytest.raises(ValueError, match="training.lr must be a finite number > 0"):
        training.train(tiny_config(lr=-1e-3), str(run), allow_config_change=True, progress=False)
    other_arch = tiny_config(num_steps=4)
    other_arch.model.ch = 64
    with pytest.raises(ValueError, match="another architecture"):
        training.train(other_arch, str(run), allow_config_change=True, progress=False)
    assert (run / "config.json").read_bytes() == before
    assert ckpt_lib.step_dirs(str(run)) == [2] and not (run / "corrupt_checkpoints").exists()
    # A fresh workdir whose data cannot be opened gets no config.json either.
    with pytest.raises(FileNotFoundError):
        training.train(bad_data, str(tmp_path / "fresh"), progress=False)
    assert not (tmp_path / "fresh" / "config.json").exists()
    assert train(run, num_steps=4).steps_run == 2  # and the run goes on


def test_keep_checkpoints_zero_is_refused_before_anything_is_deleted(tmp_path, tiny_run):
    tiny_run(tmp_path, num_steps=4)
    with pytest.raises(ValueError, match="training.keep_checkpoints must be a positive integer"):
        train(tmp_path, num_steps=8, keep_checkpoints=0)
    assert ckpt_lib.step_dirs(str(tmp_path)) == [4]


def test_a_second_trainer_on_the_same_workdir_is_refused(tmp_path):
    with files.WorkdirLock(str(tmp_path)):  # another train.py holding the workdir
        with pytest.raises(files.WorkdirInUse, match=rf"in use by pid {os.getpid()} on host"):
            train(tmp_path, num_steps=2)
    assert not (tmp_path / "config.json").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_errors_that_are_not_corruption_stop_without_moving_checkpoints(tmp_path, monkeypatch, tiny_run):
    tiny_run(tmp_path, num_steps=4)
    real = ckpt_lib.ocp.CheckpointManager.restore

    def failing_disk(self, step, *a, **k):
        raise OSError(errno.EIO, "Input/output error", str(tmp_path))

    monkeypatch.setattr(ckpt_lib.ocp.CheckpointManager, "restore", failing_disk)
    with pytest.raises(OSError, match="Input/output error"):
        train(tmp_path, num_steps=8)
    monkeypatch.setattr(ckpt_lib.ocp.CheckpointManager, "restore", real)
    assert ckpt_lib.step_dirs(str(tmp_path)) == [4] and not (tmp_path / "corrupt_checkpoints").exists()
    assert train(tmp_path, num_steps=8).steps_run == 4


def test_when_no_checkpoint_can_be_restored_training_does_not_start_over(tmp_path, tiny_run):
    tiny_run(tmp_path, num_steps=4, checkpoint_every=2, keep_checkpoints=2)
    for step in ("2", "4"):
        for f in (tmp_path / "checkpoints" / step / "state").rglob("*"):
            if f.is_file():
                f.write_bytes(b"")
    for _ in range(2):  # and not on the next try either
        with pytest.raises(RuntimeError, match="nothing was moved or deleted, and training will not start over"):
            train(tmp_path, num_steps=8, checkpoint_every=2, keep_checkpoints=2)
    assert ckpt_lib.step_dirs(str(tmp_path)) == [2, 4] and not (tmp_path / "corrupt_checkpoints").exists()
    assert loading.load(str(tmp_path))[0].info["step"] == 4  # the exported model is still there


def test_a_workdir_whose_checkpoints_are_gone_does_not_overwrite_its_trained_model(tmp_path, tiny_run):
    tiny_run(tmp_path, num_steps=4)
    shutil.rmtree(tmp_path / "checkpoints")
    rows = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(RuntimeError, match=r"holds a model trained for 4 steps .* use a new --workdir"):
        train(tmp_path, num_steps=8)
    assert loading.load(str(tmp_path))[0].info["step"] == 4 and (tmp_path / "metrics.jsonl").read_text() == rows


def test_a_state_that_no_longer_fits_the_saved_one_stops_and_moves_nothing(tmp_path, monkeypatch, tiny_run):
    # What orbax says when the code's train state has another structure than the checkpoint's.
    tiny_run(tmp_path, num_steps=4, checkpoint_every=2, keep_checkpoints=2)
    real = ckpt_lib.ocp.CheckpointManager.restore

    def changed_code(self, step, args=None, **kw):
        if "state" in args:
            raise ValueError("Structure mismatch: Target path ('opt_state', 3) not found in the checkpoint")
        return real(self, step, args=args, **kw)

    assert not ckpt_lib.is_corruption(ValueError("Structure mismatch: Target path ('opt_state', 3) not found"))
    assert not ckpt_lib.is_corruption(ValueError("Requested shape (4,) is not compatible with the stored shape (3,)"))
    assert ckpt_lib.is_corruption(ValueError("DATA_LOSS: Error reading chunk: unexpected end of file"))
    monkeypatch.setattr(ckpt_lib.ocp.CheckpointManager, "restore", changed_code)
    with pytest.raises(RuntimeError, match="Structure mismatch"):
        train(tmp_path, num_steps=8, checkpoint_every=2, keep_checkpoints=2)
    assert ckpt_lib.step_dirs(str(tmp_path)) == [2, 4] and not (tmp_path / "corrupt_checkpoints").exists()


def test_a_run_saved_before_the_model_kind_field_resumes_without_override(tmp_path, tiny_run):
    tiny_run(tmp_path, num_steps=2, checkpoint_every=2)
    for meta in (tmp_path / "checkpoints").rglob("metadata"):
        if meta.parent.name == "meta":
            doc = json.loads(meta.read_text())
            del doc["config"]["model"]["kind"], doc["config"]["model"]["num_classes"]
            meta.write_text(json.dumps(doc))
            (meta.parents[1] / ckpt_lib.CHECKSUMS).unlink()  # such a checkpoint had no checksums either
    assert train(tmp_path, num_steps=4, checkpoint_every=2).steps_run == 2


def test_a_run_saved_before_ema_warmup_resumes_as_it_trained(tmp_path, tiny_run):
    # A saved config without training.ema_warmup trained with the plain EMA: resuming it with today's
    # default (warmup on) would change its numerics, so that is refused by name; saying False resumes.
    tiny_run(tmp_path, num_steps=2, checkpoint_every=2)  # what its metadata says is what counts
    for meta in (tmp_path / "checkpoints").rglob("metadata"):
        if meta.parent.name == "meta":
            doc = json.loads(meta.read_text())
            del doc["config"]["training"]["ema_warmup"]
            meta.write_text(json.dumps(doc))
            (meta.parents[1] / ckpt_lib.CHECKSUMS).unlink()  # such a checkpoint had no checksums either
    with pytest.raises(ValueError, match="training.ema_warmup"):
        train(tmp_path, num_steps=4, checkpoint_every=2)
    assert train(tmp_path, num_steps=4, checkpoint_every=2, ema_warmup=False).steps_run == 2


def test_a_corrupt_step_is_named_as_unreadable_not_as_another_architecture(tmp_path, tiny_run):
    tiny_run(tmp_path, num_steps=4, checkpoint_every=2, keep_checkpoints=2)
    meta = next((tmp_path / "checkpoints" / "2" / "meta").rglob("metadata"))
    meta.write_text("{not json")
    (tmp_path / "checkpoints" / "2" / ckpt_lib.CHECKSUMS).unlink()  # (else its checksums say so first)
    with pytest.raises(ValueError, match=r"checkpoint 2: its metadata cannot be read"):
        loading.load(str(tmp_path), step=2)
    assert loading.load(str(tmp_path), step=4)[0].info["step"] == 4


def test_the_non_finite_stop_says_whether_a_checkpoint_exists(tmp_path, tiny_run):
    with pytest.raises(FloatingPointError, match="no checkpoint was written yet"):
        train(tmp_path / "a", num_steps=8, checkpoint_every=8, **EXPLODING)
    tiny_run(tmp_path / "b", num_steps=2, checkpoint_every=2)  # a clean checkpoint first
    with pytest.raises(FloatingPointError, match=r"the last checkpoint \(step 2\) .* is intact"):
        training.train(tiny_config(num_steps=8, checkpoint_every=8, **EXPLODING), str(tmp_path / "b"),
                       allow_config_change=True, progress=False)


def test_kill_9_mid_run_leaves_a_workdir_that_resumes(tmp_path):
    workdir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs' / 'tiny.py'}",
           f"--workdir={workdir}", "--config.training.num_steps=100000", "--config.training.checkpoint_every=1",
           "--config.training.log_every=1", "--config.training.keep_checkpoints=2"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=dict(os.environ, JAX_PLATFORMS="cpu"), text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(ckpt_lib.step_dirs(str(workdir))) < 2:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere inside the next steps: a step, an async checkpoint write or the export
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(ckpt_lib.step_dirs(str(workdir)))
    result = train(workdir, num_steps=killed_at + 2, checkpoint_every=1, log_every=1, keep_checkpoints=2)
    assert result.steps_run >= 2 and int(result.state.step) == killed_at + 2  # the lock was free, nothing lost
    spec, _ = loading.load(str(workdir))
    assert spec.info["step"] == killed_at + 2
    assert metric_steps(workdir) == list(range(1, killed_at + 3))  # each step logged once


def test_command_line_errors_are_one_line(tmp_path):
    # A bad --config override, in train.py's flag parser: what the terminal shows is one line on stderr.
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs' / 'tiny.py'}",
                          f"--workdir={tmp_path / 'run'}", "--config.training.lrr=1"], cwd=tmp_path, text=True,
                         capture_output=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert len(out.stderr.strip().splitlines()) == 1 and re.search("error: bad --config: .*lrr", out.stderr), out.stderr
    assert not (tmp_path / "run").exists()
    # A --workdir that cannot be made: an OSError of one line, which train.py prints as "error: <it>" (its
    # handler of the library's errors; test_reliability's failed saves go through it on the command line).
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError) as e:
        train(tmp_path / "file" / "run", num_steps=2)
    assert re.fullmatch(r"\[Errno 20\] Not a directory: .*", str(e.value)), str(e.value)


@pytest.mark.parametrize("override,match", [
    ({"batch_size": 6}, None),  # fine on one device
    ({"log_every": 3, "steps_per_dispatch": 2}, r"training.log_every \(3\) must be a multiple"),
    ({"num_steps": -1}, "training.num_steps must be an integer >= 0"),
    ({"keep_checkpoints": 0}, "training.keep_checkpoints must be a positive integer"),
    ({"lr": -1e-4}, "training.lr must be a finite number > 0"),
    ({"lr": float("nan")}, "training.lr must be a finite number > 0"),
    ({"ema_decay": 1.0}, r"training.ema_decay must be a number in \[0, 1\)"),
    ({"compute_dtype": "float16"}, "training.compute_dtype must be one of float32, bfloat16; got 'float16'"),
    ({"lrr": 1e-4}, "unknown config field training.lrr; the training block has adam_b1, adam_b2, batch_size"),
    ({"diffusion.schedule": "cosinus"}, "diffusion.schedule must be one of"),
    ({"diffusion.prediction_type": "score"}, "diffusion.prediction_type must be one of"),
    ({"data.channels": 2}, r"data.channels must be 1 \(grey\) or 3 \(RGB\)"),
    ({"data.num_workers": -2}, r"data.num_workers must be an integer >= 0, or -1 \(the usable cores\); got -2"),
    ({"model.ch_mul": (1, 2)}, "unknown config field model.ch_mul"),
    ({"model.kind": "transformer"},
     "model.kind must be one of unet, cross_attention_unet, autoencoder_kl, autoencoder_vq; got 'transformer'"),
    ({"model.kind": "unet2d_condition"}, "model.kind must be one of .*; got 'unet2d_condition'"),
    ({"adam_b1": 1.0}, r"training.adam_b1 must be a number in \[0, 1\)"),
    ({"model.norm_groups": 12}, r"model.norm_groups must be a positive integer dividing every level's channels \(32\)"),
    ({"model.norm_groups": 32}, "model.norm_groups must be at most 16 .*cannot see the timestep"),
])
def test_bad_training_configs(override, match):
    c = tiny_config(**{k: v for k, v in override.items() if "." not in k})
    for k, v in override.items():
        if "." in k:
            block, field = k.split(".")
            c[block][field] = v
    if match is None:
        validate_config(c)
    else:
        with pytest.raises(ValueError, match=match):
            validate_config(c)


def test_global_batch_must_divide_by_the_device_count_and_fit_in_memory(tmp_path):
    with pytest.raises(ValueError, match=r"training.batch_size \(6\) must be divisible by the number of devices \(4\)"):
        validate_config(tiny_config(batch_size=6), num_devices=4)
    with pytest.raises(ValueError, match=r"training.batch_size=800000000 needs .* GiB of host memory"):
        train(tmp_path, batch_size=800_000_000)
    assert not os.listdir(tmp_path)  # refused before anything was written
