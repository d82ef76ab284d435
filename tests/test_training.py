"""Training: data order, the sharded step (1 vs 8 devices, 1 vs 2 processes), exact resume.

Multi-device runs happen in this process (conftest.py gives it 8 CPU devices); subprocesses only
where a process boundary is what is tested (two processes). All use configs/tiny.py: 8x8 digits, a
small UNet, a few steps. tests/test_workdir.py has the workdir's guarantees.
"""

import json
import os
import re
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from PIL import Image
from helpers import EXPLODING, ROOT, leaves, metric_steps, tiny_config, train

from ddim_jax import data as data_lib
from ddim_jax import loading, training
from ddim_jax.config import spec_from_config
from ddim_jax.parallel import make_mesh
from ddim_jax.training.run import build

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
    c = build(tiny_config(**EXPLODING))
    mesh = make_mesh()
    # The program of every run of configs/tiny.py on the 8 devices (lr is one of the step's arguments).
    step = training.state.cached_train_step(c, mesh)
    src = data_lib.make_source(c.config.data)

    def batch(s):
        return jax.device_put(data_lib.process_batch(src, 16, s, 0, 0, 1)[None], step.batch_sharding)

    init = training.init_state(c, mesh)  # (the step donates its input state, so this one is kept aside)
    fresh = leaves((init.params, init.ema_params, init.opt_state))
    state, m = step(training.init_state(c, mesh), batch(0))
    assert bool(m["finite"][0])  # kept: everything moved
    kept = leaves((state.params, state.ema_params, state.opt_state))
    assert all(not np.array_equal(a, b) for a, b in zip(kept[:2], fresh[:2]))
    state, m = step(state, batch(1))
    assert not bool(m["finite"][0])  # skipped: nothing moved, and it was counted
    assert all(np.array_equal(a, b) for a, b in zip(leaves((state.params, state.ema_params, state.opt_state)), kept))
    assert (int(state.step), int(state.nonfinite_in_a_row), int(state.nonfinite_total)) == (2, 1, 1)
    # Back to sane parameters: the next update is kept again, the run of non-finite steps ends.
    state = state.replace(params=init.params, ema_params=init.ema_params, opt_state=init.opt_state)
    state, m = step(state, batch(2))
    assert bool(m["finite"][0]) and all(np.all(np.isfinite(a)) for a in leaves(state.params))
    assert (int(state.step), int(state.nonfinite_in_a_row), int(state.nonfinite_total)) == (3, 0, 1)


def test_ema_follows_its_decay_rule():
    # EMA_{s+1} = d_s EMA_s + (1 - d_s) params_{s+1}, d_s = min(decay, (1 + s) / (10 + s)) with warmup (the
    # default: the first update weighs the initial weights by 0.1, the second by 2/11), else decay throughout.
    c = build(tiny_config())
    mesh = make_mesh()
    step = training.state.cached_train_step(c, mesh)
    src = data_lib.make_source(c.config.data)

    def batch(s):
        return jax.device_put(data_lib.process_batch(src, 16, s, 0, 0, 1)[None], step.batch_sharding)

    state = training.init_state(c, mesh)
    ema = leaves(state.ema_params)
    for s, d in enumerate([0.1, 2 / 11]):
        state, _ = step(state, batch(s))
        ema = [d * e + (1 - d) * p for e, p in zip(ema, leaves(state.params))]
        for got, want in zip(leaves(state.ema_params), ema):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    decay_at = training.state.ema_decay_at
    assert float(decay_at(10**6, 0.999, True)) == pytest.approx(0.999)
    assert [float(decay_at(s, 0.5, False)) for s in (0, 1, 10**6)] == [0.5, 0.5, 0.5]


def test_runs_differing_in_optimizer_and_ema_settings_share_one_program_and_each_gets_its_own():
    mesh = make_mesh()
    runs = {"default": build(tiny_config()),  # lr 2e-3 with 2 warmup steps: the first update's lr is 1e-3
            "other": build(tiny_config(lr=1e-4, warmup_steps=1, grad_clip=0.5, adam_b1=0.5, adam_b2=0.9,
                                       ema_decay=0.5, ema_warmup=False))}
    steps = {name: training.state.cached_train_step(run, mesh) for name, run in runs.items()}
    assert steps["default"].jitted is steps["other"].jitted
    src = data_lib.make_source(runs["default"].config.data)
    for name, lr, ema_decay in (("default", 1e-3, 0.1), ("other", 1e-4, 0.5)):
        step = steps[name]
        start = training.init_state(runs[name], mesh)
        before = leaves(start.params)
        state, _ = step(start, jax.device_put(data_lib.process_batch(src, 16, 0, 0, 0, 1)[None], step.batch_sharding))
        moved = np.concatenate([np.abs(a - b).ravel() for a, b in zip(leaves(state.params), before)])
        # Adam's first update is lr * g / (|g| + eps) elementwise (bias-corrected, whatever b1, b2 and clipping):
        # lr for the weights whose gradient is well above eps (the zero-initialised output layer's, at step 0).
        assert lr * (1 - 1e-3) <= moved.max() <= lr * (1 + 1e-4)
        for got, p, p0 in zip(leaves(state.ema_params), leaves(state.params), before):
            np.testing.assert_allclose(got, ema_decay * p0 + (1 - ema_decay) * p, rtol=1e-5, atol=1e-7)
    assert steps["default"].jitted._cache_size() == 1  # one program for both

def test_one_and_eight_devices_give_the_same_losses_and_replicas_agree():
    assert jax.device_count() == 8
    c = build(tiny_config())
    src = data_lib.make_source(c.config.data)
    out = {}
    for n in (1, 8):
        mesh = make_mesh(jax.devices()[:n])
        state, step = training.init_state(c, mesh), training.state.cached_train_step(c, mesh)
        sharding = step.batch_sharding
        losses = []
        for s in range(3):
            state, m = step(state, jax.device_put(data_lib.process_batch(src, 16, s, 0, 0, 1)[None], sharding))
            losses.append(float(m["loss"][0]))
        shards = [np.asarray(x.data) for x in jax.tree.leaves(state.params)[0].addressable_shards]
        assert len(shards) == n and all(np.array_equal(shards[0], x) for x in shards), "replicas differ"
        out[n] = (losses, leaves(state.params))
    np.testing.assert_allclose(out[1][0], out[8][0], rtol=1e-5)
    for a, b in zip(out[1][1], out[8][1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=adam_atol(c.config))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_eight_devices(tmp_path, tiny_run):
    driver = """
    import os, sys, jax, numpy as np
    sys.path.insert(0, '.')
    pid, nproc, port, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    if nproc > 1:
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
        jax.distributed.initialize(f'127.0.0.1:{port}', nproc, pid)
    from configs.tiny import get_config
    from ddim_jax import training
    assert jax.device_count() == 8 and jax.process_count() == nproc
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
                              env=dict(env, XLA_FLAGS=re.sub(r"device_count=\d+", "device_count=4",
                                                             os.environ["XLA_FLAGS"])),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for p in range(2)]
    # The reference, meanwhile: the same config on one process's eight devices (conftest.py's run, shared).
    one = tiny_run(num_steps=4)
    _, state, meta = training.load_checkpoint(one)
    assert meta["step"] == 4
    for p in procs:
        out, _ = p.communicate(timeout=400)
        assert p.returncode == 0, out[-4000:]
    load = lambda d, i: [v for _, v in sorted(np.load(os.path.join(d, f"params_{i}.npz")).items(),  # noqa: E731
                                               key=lambda kv: int(kv[0].split("_")[1]))]
    p0, p1, ref = load(two, 0), load(two, 1), leaves(state.params)
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
    return leaves(training.init_state(build(c), make_mesh()).params)


# ------------------------------------------------------------------------------------------------
# Resume.


def test_interrupted_then_resumed_equals_uninterrupted_bitwise(tmp_path, tiny_run):
    full = train(tmp_path / "full", num_steps=8, sample_every=8)  # and a preview, which draws apart from training
    tiny_run(tmp_path / "split", num_steps=4)  # a run of the same config stopped at step 4 (conftest.py's, shared)
    assert metric_steps(tmp_path / "split") == [2, 4]
    rest = train(tmp_path / "split", num_steps=8)
    assert rest.steps_run == 4
    for a, b in zip(leaves((full.state.params, full.state.ema_params, full.state.opt_state)),
                    leaves((rest.state.params, rest.state.ema_params, rest.state.opt_state))):
        np.testing.assert_array_equal(a, b)
    lines = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4, 6, 8] and all(np.isfinite(x["loss"]) for x in lines)
    assert list((tmp_path / "full" / "tensorboard").iterdir())
    grid = np.asarray(Image.open(tmp_path / "full" / "samples" / "step_00000008.png"))
    assert grid.shape == (2 * 9 * 8 + 8, 2 * 9 * 8 + 8)  # 4 samples (on 8 devices) in a 2x2 grid, 8x8 drawn 8x larger
    assert not (tmp_path / "split" / "samples").exists()

    # The exported model is the EMA params of the last checkpoint, in the one model format.
    spec, params = loading.load(str(tmp_path / "split"))
    assert spec == spec_from_config(tiny_config()) and spec.info["step"] == 8
    for a, b in zip(leaves(params), leaves(rest.state.ema_params)):
        np.testing.assert_array_equal(a, b)
    spec4, params4 = loading.load(str(tmp_path / "split"), step=4)
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
    saved, state, meta = training.load_checkpoint(str(tmp_path / "split"))
    assert meta["step"] == 8 and meta["data_position"] == 8 and saved.config.training.num_steps == 8
