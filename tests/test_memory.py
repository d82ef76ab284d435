"""The memory plan (``ddim_jax.training.memory``): what a device holds per train step, and the refusal
of a run that cannot fit, before anything is written."""

import jax
import pytest
from helpers import tiny_config, train

from ddim_jax.config import spec_from_config
from ddim_jax.parallel import make_mesh
from ddim_jax.training import checkpoints, memory
from ddim_jax.training.run import build
from ddim_jax.unet import count_params


def test_the_plan_adds_up_the_state_the_batch_and_xla_temporaries():
    mesh = make_mesh(jax.devices()[:1])
    small, large = (memory.memory_plan(build(tiny_config(batch_size=b)), mesh) for b in (16, 64))
    n = count_params(spec_from_config(tiny_config()).param_shapes())
    assert small.params == small.ema == 4 * n  # float32, replicated
    assert 2 * 4 * n <= small.optimizer <= 2 * 4 * n + 64  # Adam's two moments (and its step counters)
    assert small.batch == 16 * 8 * 8 * 1 + 16 * 4  # uint8 images and int32 labels of one step
    # Activations scale with the batch: 4x the rows, at least 2x the temporaries.
    assert 0 < small.temporaries and large.temporaries > 2 * small.temporaries
    assert small.total == small.params + small.ema + small.optimizer + small.batch + small.temporaries
    assert small.limit > 0 and small.device == "cpu:0"


def test_a_run_that_cannot_fit_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(memory, "device_memory", lambda device: 2 ** 20)
    with pytest.raises(ValueError, match=r"training.batch_size=16 needs .* per device \(params .*\) and cpu:0 has "
                                         r"1.0 MiB: try a smaller training.batch_size .* training.remat=True, or "
                                         r"training.compute_dtype='bfloat16'$"):
        train(tmp_path / "run", devices=jax.devices()[:1])  # the step the test above compiled, in one process
    assert "memory per device (cpu:0)" in capsys.readouterr().out
    assert not (tmp_path / "run" / "config.json").exists() and not (tmp_path / "run" / "model").exists()
    assert checkpoints.step_dirs(str(tmp_path / "run")) == [] and not (tmp_path / "run" / "metrics.jsonl").exists()
