"""train.py's system: data order, the sharded step, checkpoints, resume, preemption, bad input, and a
workdir that never loses data.

Multi-device runs happen in this process (conftest.py gives it 8 CPU devices); subprocesses only
where a process boundary is what is tested (two processes, SIGTERM, the command line). All use
configs/tiny.py: 8x8 digits, a small UNet, a few steps.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddim_jax import data as data_lib
from ddim_jax import files, models, training
from ddim_jax.config import validate_config
from ddim_jax.parallel import host, make_mesh
from ddim_jax.training import checkpoints as ckpt_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(**training_overrides):
    sys.path.insert(0, str(ROOT))
    try:
        from configs.tiny import get_config
    finally:
        sys.path.remove(str(ROOT))
    c = get_config()
    c.training.update(training_overrides)
    return c


ONE = jax.devices()[:1]


def leaves(tree):
    return [np.asarray(host(x)) for x in jax.tree.leaves(tree)]


# ------------------------------------------------------------------------------------------------
# Data.


def test_batch_order_is_a_pure_function_of_seed_and_step():
    n, b = 10, 4
    stream = np.concatenate([data_lib.batch_indices(n, b, s, seed=3) for s in range(5)])  # 20 = 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert not np.array_equal(stream[:10], stream[10:20])  # reshuffled each epoch
    np.testing.assert_array_equal(data_lib.batch_indices(n, b, 3, seed=3), stream[12:16])
    src = data_lib.ArraySource(np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1), "ramp")
    halves = [data_lib.process_batch(src, b, 3, 3, p, 2) for p in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves)[:, 0, 0, 0], stream[12:16])


def test_digits_and_image_folder_sources(tmp_path):
    from PIL import Image

    digits, labels = data_lib.load_digits("all")
    assert digits.shape == (1797, 8, 8, 1) and digits.dtype == np.uint8 and digits.max() == 255
    assert labels.shape == (1797,) and set(labels.tolist()) == set(range(10))
    rng = np.random.default_rng(0)
    (tmp_path / "sub").mkdir()
    for i, (h, w) in enumerate([(20, 30), (16, 16), (40, 24)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            tmp_path / ("sub" if i else ".") / f"im{i}.{'png' if i % 2 else 'jpg'}")
    (tmp_path / "notes.txt").write_text("not an image")
    imgs = data_lib.load_folder_images(str(tmp_path), 8)
    assert imgs.shape == (3, 8, 8, 3) and imgs.dtype == np.uint8
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        data_lib.load_folder_images(str(tmp_path / "empty"), 8)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        data_lib.load_folder_images(str(tmp_path / "nope"), 8)


def test_tfds_source_under_mock_data_and_a_clear_error_when_not_prepared(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    c = tiny_config()
    c.data.update(dataset="cifar10", image_size=8, channels=3, crop="none")
    with tfds.testing.mock_data(num_examples=12):
        src = data_lib.make_source(c.data)
        batch = data_lib.process_batch(src, 4, 0, 0, 0, 1)
    assert len(src) == 12 and batch.shape == (4, 8, 8, 3) and batch.dtype == np.uint8
    c.data.data_dir = str(tmp_path)
    with pytest.raises(RuntimeError, match=r"not prepared .* tfds build cifar10 --data_dir="):
        data_lib.make_source(c.data)


# ------------------------------------------------------------------------------------------------
# The step.


def test_non_finite_updates_are_skipped_and_counted():
    c = tiny_config()
    mesh = make_mesh(ONE)
    unet = models.spec_from_config(c).build()

    class PoisonedAtT7:  # NaN output whenever timestep 7 is in the batch
        def init(self, *a, **k):
            return unet.init(*a, **k)

        def apply(self, variables, x, t, **kw):
            out = unet.apply(variables, x, t, **kw)
            return out * jnp.where(jnp.any(t == 7), jnp.nan, 1.0)

    model = PoisonedAtT7()
    state = training.init_state(c, mesh)
    step = training.make_train_step(c, mesh, model)
    src = data_lib.make_source(c.data)
    skipped = kept = 0
    for s in range(12):
        before = leaves(state.params)
        images = jnp.asarray(data_lib.process_batch(src, 16, s, 0, 0, 1))[None]
        state, m = step(state, images)
        after = leaves(state.params)
        assert all(np.all(np.isfinite(a)) for a in after)
        if bool(m["finite"][0]):
            kept += 1
            assert any(not np.array_equal(a, b) for a, b in zip(after, before))
        else:
            skipped += 1
            assert all(np.array_equal(a, b) for a, b in zip(after, before))
    assert skipped > 0 and kept > 0 and int(state.nonfinite_total) == skipped and int(state.step) == 12


def test_one_and_eight_devices_give_the_same_losses_and_replicas_agree():
    assert jax.device_count() == 8
    c = tiny_config()
    src = data_lib.make_source(c.data)
    out = {}
    for n in (1, 8):
        mesh = make_mesh(jax.devices()[:n])
        state, step = training.init_state(c, mesh), training.make_train_step(c, mesh)
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))
        losses = []
        for s in range(3):
            state, m = step(state, jax.device_put(data_lib.process_batch(src, 16, s, 0, 0, 1)[None], sharding))
            losses.append(float(m["loss"][0]))
        shards = [np.asarray(x.data) for x in jax.tree.leaves(state.params)[0].addressable_shards]
        assert len(shards) == n and all(np.array_equal(shards[0], x) for x in shards), "replicas differ"
        out[n] = (losses, leaves(state.params))
    np.testing.assert_allclose(out[1][0], out[8][0], rtol=1e-5)
    for a, b in zip(out[1][1], out[8][1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=adam_atol(c))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_four_devices(tmp_path):
    driver = """
    import os, sys, jax, numpy as np
    sys.path.insert(0, '.')
    pid, nproc, port, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    if nproc > 1:
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
        jax.distributed.initialize(f'127.0.0.1:{port}', nproc, pid)
    from configs.tiny import get_config
    from ddim_jax import training
    assert jax.device_count() == 4 and jax.process_count() == nproc
    c = get_config()
    c.training.num_steps = 4
    r = training.train(c, workdir, progress=False)
    np.savez(os.path.join(workdir, f'params_{pid}.npz'),
             *[np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(r.state.params)])
    """
    path = tmp_path / "driver.py"
    path.write_text(textwrap.dedent(driver))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    port = str(_free_port())
    two = str(tmp_path / "two")
    procs = [subprocess.Popen([sys.executable, str(path), str(p), "2", port, two], cwd=ROOT, text=True,
                              env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for p in range(2)]
    one = str(tmp_path / "one")
    single = subprocess.run([sys.executable, str(path), "0", "1", "0", one], cwd=ROOT, text=True, timeout=400,
                            env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4"), capture_output=True)
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-3000:]
    for p in procs:
        out, _ = p.communicate(timeout=400)
        assert p.returncode == 0, out[-4000:]
    load = lambda d, i: [v for _, v in sorted(np.load(os.path.join(d, f"params_{i}.npz")).items(),
                                               key=lambda kv: int(kv[0].split("_")[1]))]
    p0, p1, ref = load(two, 0), load(two, 1), load(one, 0)
    for a, b in zip(p0, p1):
        np.testing.assert_array_equal(a, b)  # identical on both processes
    metrics = lambda d: [json.loads(x)["loss"] for x in open(os.path.join(d, "metrics.jsonl"))]  # noqa: E731
    np.testing.assert_allclose(metrics(two), metrics(one), rtol=1e-6)  # the same losses, step by step
    # And the same parameters, to round-off (see adam_atol).
    atol = adam_atol(tiny_config())
    for a, r in zip(p0, ref):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=atol)
    moved = max(np.abs(a - b).max() for a, b in zip(p0, load_init(one)))
    assert moved > 10 * atol, moved  # it did train, by far more than the tolerance


def adam_atol(config):
    """Tolerance for parameters trained on differently-ordered all-reduces. Adam divides each gradient
    coordinate by its own running RMS, so where a coordinate's gradient is mostly cancellation
    (DDPM's near-zero-initialised convolutions make many such), float32 round-off in the reduction
    order moves the parameter by a visible fraction of the learning rate. A real divergence (other
    data, a missing pmean) moves most parameters by about lr per step, 20x this bound."""
    return 0.05 * config.training.lr


def load_init(workdir):
    import ml_collections

    c = ml_collections.ConfigDict(json.loads(open(os.path.join(workdir, "config.json")).read()))
    return leaves(training.init_state(c, make_mesh(ONE)).params)


# ------------------------------------------------------------------------------------------------
# Checkpoints, resume, preemption, config checks.


def train(workdir, devices=None, **overrides):
    return training.train(tiny_config(**overrides), str(workdir), progress=False, devices=devices)


def metric_steps(workdir):
    return [json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_interrupted_then_resumed_equals_uninterrupted_bitwise(tmp_path):
    full = train(tmp_path / "full", num_steps=8)
    part = train(tmp_path / "split", num_steps=4)
    assert int(part.state.step) == 4
    rest = train(tmp_path / "split", num_steps=8)
    assert rest.steps_run == 4
    for a, b in zip(leaves((full.state.params, full.state.ema_params, full.state.opt_state)),
                    leaves((rest.state.params, rest.state.ema_params, rest.state.opt_state))):
        np.testing.assert_array_equal(a, b)
    lines = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4, 6, 8] and all(np.isfinite(x["loss"]) for x in lines)
    assert list((tmp_path / "full" / "tensorboard").iterdir())

    # The exported model is the EMA params of the last checkpoint, in the one model format.
    spec, params = models.load(str(tmp_path / "split"))
    assert spec == models.spec_from_config(tiny_config()) and spec.info["step"] == 8
    for a, b in zip(leaves(params), leaves(rest.state.ema_params)):
        np.testing.assert_array_equal(a, b)
    spec4, params4 = models.load(str(tmp_path / "split"), step=4)
    assert spec4.info["step"] == 4 and not np.array_equal(leaves(params4)[0], leaves(params)[0])

    # A corrupted newest checkpoint: warn, move it aside, resume from the previous one; the metrics of
    # the steps run again appear once.
    ckdir = tmp_path / "split" / "checkpoints"
    assert sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit()) == [4, 8]
    for f in (ckdir / "8" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    assert metric_steps(tmp_path / "split") == [2, 4, 6, 8]
    again = train(tmp_path / "split", num_steps=8)
    assert again.steps_run == 4  # from step 4
    assert (tmp_path / "split" / "corrupt_checkpoints" / "8").is_dir()
    assert metric_steps(tmp_path / "split") == [2, 4, 6, 8]
    for a, b in zip(leaves(full.state.params), leaves(again.state.params)):
        np.testing.assert_array_equal(a, b)

    # A different config is refused unless asked for, compared with the checkpoints' own config even
    # when config.json is gone.
    os.remove(tmp_path / "split" / "config.json")
    with pytest.raises(ValueError, match=r"different config \(training\.lr\)"):
        train(tmp_path / "split", num_steps=8, lr=5e-4)
    cfg, state, meta = training.load_checkpoint(str(tmp_path / "split"))
    assert meta["step"] == 8 and meta["data_position"] == 8 and cfg.training.num_steps == 8


def test_a_failed_run_leaves_config_json_and_checkpoints_as_they_were(tmp_path):
    run = tmp_path / "run"
    train(run, num_steps=2, checkpoint_every=2, log_every=2)
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


def test_keep_checkpoints_zero_is_refused_before_anything_is_deleted(tmp_path):
    train(tmp_path, num_steps=4)
    with pytest.raises(ValueError, match="training.keep_checkpoints must be a positive integer"):
        train(tmp_path, num_steps=8, keep_checkpoints=0)
    assert ckpt_lib.step_dirs(str(tmp_path)) == [4]


def test_a_second_trainer_on_the_same_workdir_is_refused(tmp_path):
    with files.WorkdirLock(str(tmp_path)):  # another train.py holding the workdir
        with pytest.raises(files.WorkdirInUse, match=rf"in use by pid {os.getpid()} on host"):
            train(tmp_path, num_steps=2)
    assert not (tmp_path / "config.json").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_errors_that_are_not_corruption_stop_without_moving_checkpoints(tmp_path, monkeypatch):
    import errno

    train(tmp_path, num_steps=4)
    real = ckpt_lib.ocp.CheckpointManager.restore

    def failing_disk(self, step, *a, **k):
        raise OSError(errno.EIO, "Input/output error", str(tmp_path))

    monkeypatch.setattr(ckpt_lib.ocp.CheckpointManager, "restore", failing_disk)
    with pytest.raises(OSError, match="Input/output error"):
        train(tmp_path, num_steps=8)
    monkeypatch.setattr(ckpt_lib.ocp.CheckpointManager, "restore", real)
    assert ckpt_lib.step_dirs(str(tmp_path)) == [4] and not (tmp_path / "corrupt_checkpoints").exists()
    assert train(tmp_path, num_steps=8).steps_run == 4


def test_when_no_checkpoint_can_be_restored_training_does_not_start_over(tmp_path):
    train(tmp_path, num_steps=4, checkpoint_every=2, keep_checkpoints=2)
    for step in ("2", "4"):
        for f in (tmp_path / "checkpoints" / step / "state").rglob("*"):
            if f.is_file():
                f.write_bytes(b"")
    with pytest.raises(RuntimeError, match="refusing to start over from step 0"):
        train(tmp_path, num_steps=8, checkpoint_every=2, keep_checkpoints=2)
    assert sorted(p.name for p in (tmp_path / "corrupt_checkpoints").iterdir()) == ["2", "4"]
    with pytest.raises(RuntimeError, match="refusing to start over"):  # and not on the next try either
        train(tmp_path, num_steps=8, checkpoint_every=2, keep_checkpoints=2)


def test_a_corrupt_step_is_named_as_unreadable_not_as_another_architecture(tmp_path):
    train(tmp_path, num_steps=4, checkpoint_every=2, keep_checkpoints=2)
    meta = next((tmp_path / "checkpoints" / "2" / "meta").rglob("metadata"))
    meta.write_text("{not json")
    with pytest.raises(ValueError, match=r"checkpoint 2: its metadata cannot be read"):
        models.load(str(tmp_path), step=2)
    assert models.load(str(tmp_path), step=4)[0].info["step"] == 4


def test_the_non_finite_stop_says_whether_a_checkpoint_exists(tmp_path):
    # lr = 1e38 sends the parameters to ~1e38 after the first update; every later loss overflows.
    with pytest.raises(FloatingPointError, match="no checkpoint was written yet"):
        train(tmp_path / "a", num_steps=8, lr=1e38, max_nonfinite=2, checkpoint_every=8)
    train(tmp_path / "b", num_steps=2, checkpoint_every=2)  # a clean checkpoint first
    with pytest.raises(FloatingPointError, match=r"the last checkpoint \(step 2\) .* is intact"):
        training.train(tiny_config(num_steps=8, lr=1e38, max_nonfinite=2, checkpoint_every=8), str(tmp_path / "b"),
                       allow_config_change=True, progress=False)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    workdir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs' / 'tiny.py'}",
           f"--workdir={workdir}", "--config.training.num_steps=100000", "--config.training.checkpoint_every=1000",
           "--config.training.log_every=1"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=dict(os.environ, JAX_PLATFORMS="cpu"), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    assert "preempted: step" in out
    steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and 3 <= steps[0] < 1000, steps
    assert models.load(str(workdir))[0].info["step"] == steps[0]  # the export is as new as the checkpoint


def test_command_line_errors_are_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    for args, match in [(["--config.training.lrr=1"], "error: bad --config: .*lrr"),
                        ([f"--workdir={tmp_path / 'file' / 'run'}"], r"error: \[Errno 20\] Not a directory")]:
        out = subprocess.run([sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs' / 'tiny.py'}",
                              f"--workdir={tmp_path / 'run'}", *args], cwd=tmp_path, text=True, capture_output=True,
                             env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
        assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert len(out.stderr.strip().splitlines()) == 1 and __import__("re").search(match, out.stderr), out.stderr


@pytest.mark.parametrize("override,match", [
    ({"batch_size": 6}, None),  # fine on one device
    ({"log_every": 3, "steps_per_dispatch": 2}, r"training.log_every \(3\) must be a multiple"),
    ({"num_steps": -1}, "training.num_steps must be an integer >= 0"),
    ({"keep_checkpoints": 0}, "training.keep_checkpoints must be a positive integer"),
    ({"lr": -1e-4}, "training.lr must be a finite number > 0"),
    ({"lr": float("nan")}, "training.lr must be a finite number > 0"),
    ({"ema_decay": 1.0}, r"training.ema_decay must be a number in \[0, 1\)"),
    ({"lrr": 1e-4}, "unknown config field training.lrr; the training block has batch_size"),
    ({"diffusion.schedule": "cosinus"}, "diffusion.schedule must be one of"),
    ({"diffusion.prediction_type": "score"}, "diffusion.prediction_type must be one of"),
    ({"data.channels": 2}, r"data.channels must be 1 \(grey\) or 3 \(RGB\)"),
    ({"model.ch_mul": (1, 2)}, "unknown config field model.ch_mul"),
    ({"model.kind": "transformer"}, "model kind must be one of unet"),
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
