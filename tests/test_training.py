"""train.py's system: data order, the sharded step, checkpoints, resume, preemption, bad input.

Runs that need several devices or processes run in subprocesses (the device count is fixed when
JAX starts). All use configs/tiny.py: 8x8 digits, a small UNet, a few steps.
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
from ddim_jax import training

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


def run_python(code: str, devices: int = 1, timeout: int = 300, **env) -> str:
    full_env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
                    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **env)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def leaves(tree):
    return [np.asarray(training._host(x)) for x in jax.tree.leaves(tree)]


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
    mesh = training.make_mesh()
    tx, schedule = training.make_optimizer(c), training.make_diffusion_schedule(c)
    unet = training.make_model(c)

    class PoisonedAtT7:  # NaN output whenever timestep 7 is in the batch
        def init(self, *a, **k):
            return unet.init(*a, **k)

        def apply(self, variables, x, t, **kw):
            out = unet.apply(variables, x, t, **kw)
            return out * jnp.where(jnp.any(t == 7), jnp.nan, 1.0)

    model = PoisonedAtT7()
    state = training.init_state(c, unet, tx, mesh)
    step = training.make_train_step(c, model, tx, schedule, mesh)
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
    code = """
    import sys, jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, '.')
    from configs.tiny import get_config
    from ddim_jax import training, data as data_lib
    assert jax.device_count() == 8
    c = get_config()
    out = {}
    for n in (1, 8):
        mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:n]), ('data',))
        model, tx, sched = training.make_model(c), training.make_optimizer(c), training.make_diffusion_schedule(c)
        state = training.init_state(c, model, tx, mesh)
        step = training.make_train_step(c, model, tx, sched, mesh)
        src = data_lib.make_source(c.data)
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, 'data'))
        losses = []
        for s in range(3):
            images = jax.device_put(data_lib.process_batch(src, 16, s, 0, 0, 1)[None], sharding)
            state, m = step(state, images)
            losses.append(float(m['loss'][0]))
        shards = [np.asarray(s.data) for s in jax.tree.leaves(state.params)[0].addressable_shards]
        assert len(shards) == n and all(np.array_equal(shards[0], x) for x in shards), 'replicas differ'
        out[n] = (losses, [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(state.params)])
    np.testing.assert_allclose(out[1][0], out[8][0], rtol=1e-5)
    for a, b in zip(out[1][1], out[8][1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=ATOL)
    print('losses', out[1][0], out[8][0])
    """
    assert "losses" in run_python(code.replace("ATOL", repr(adam_atol(tiny_config()))), devices=8)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    c = training.load_config(workdir)
    state = training.init_state(c, training.make_model(c), training.make_optimizer(c), training.make_mesh())
    return leaves(state.params)


# ------------------------------------------------------------------------------------------------
# Checkpoints, resume, preemption, config checks.


def test_interrupted_then_resumed_equals_uninterrupted_bitwise(tmp_path):
    full = training.train(tiny_config(num_steps=8), str(tmp_path / "full"), progress=False)
    part = training.train(tiny_config(num_steps=4), str(tmp_path / "split"), progress=False)
    assert int(part.state.step) == 4
    rest = training.train(tiny_config(num_steps=8), str(tmp_path / "split"), progress=False)
    assert rest.steps_run == 4
    for a, b in zip(leaves((full.state.params, full.state.ema_params, full.state.opt_state)),
                    leaves((rest.state.params, rest.state.ema_params, rest.state.opt_state))):
        np.testing.assert_array_equal(a, b)
    lines = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4, 6, 8] and all(np.isfinite(x["loss"]) for x in lines)
    assert list((tmp_path / "full" / "tensorboard").iterdir())

    # A corrupted newest checkpoint: warn, move it aside, resume from the previous one.
    ckdir = tmp_path / "split" / "checkpoints"
    assert sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit()) == [4, 8]
    for f in (ckdir / "8" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    again = training.train(tiny_config(num_steps=8), str(tmp_path / "split"), progress=False)
    assert again.steps_run == 4  # from step 4
    assert (tmp_path / "split" / "corrupt_checkpoints" / "8").is_dir()
    for a, b in zip(leaves(full.state.params), leaves(again.state.params)):
        np.testing.assert_array_equal(a, b)

    # A different config in the same workdir is refused unless asked for.
    with pytest.raises(ValueError, match=r"different config \(training\.lr\)"):
        training.train(tiny_config(num_steps=8, lr=5e-4), str(tmp_path / "split"), progress=False)
    cfg, state, meta = training.load_checkpoint(str(tmp_path / "split"))
    assert meta["step"] == 8 and meta["data_position"] == 8 and cfg.training.num_steps == 8


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


@pytest.mark.parametrize("override,match", [
    ({"batch_size": 6}, None),  # fine on one device
    ({"log_every": 3, "steps_per_dispatch": 2}, r"training.log_every \(3\) must be a multiple"),
    ({"num_steps": -1}, "training.num_steps must be a positive integer"),
    ({"diffusion.schedule": "cosinus"}, "diffusion.schedule must be one of"),
    ({"diffusion.prediction_type": "score"}, "diffusion.prediction_type must be one of"),
])
def test_bad_training_configs(override, match):
    c = tiny_config(**{k: v for k, v in override.items() if "." not in k})
    for k, v in override.items():
        if "." in k:
            block, field = k.split(".")
            c[block][field] = v
    if match is None:
        training.validate_config(c)
    else:
        with pytest.raises(ValueError, match=match):
            training.validate_config(c)


def test_global_batch_must_divide_by_the_device_count():
    code = """
    import sys; sys.path.insert(0, '.')
    from configs.tiny import get_config
    from ddim_jax import training
    c = get_config(); c.training.batch_size = 6
    try:
        training.validate_config(c)
    except ValueError as e:
        print(e)
    """
    out = run_python(code, devices=4)
    assert "training.batch_size (6) must be divisible by the number of devices (4)" in out
