"""Sampling on a (data, fsdp) mesh (``sample.py --mesh``, ``loading.load_model(mesh=...)``): the parameters split
over 'fsdp' by training's rule, the batch over every device, and the same images as on one device. In this
process's 8 CPU devices (conftest.py)."""

import pathlib
import sys

import jax
import numpy as np
import pytest
from helpers import tiny_config

from ddim_jax import experiments as ex
from ddim_jax import loading, models
from ddim_jax.config import spec_from_config
from ddim_jax.parallel import FSDP_MIN_SIZE, fsdp_spec, gather_rows

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sample  # noqa: E402  (the command line, driven in-process)

P = jax.sharding.PartitionSpec
MESHES = [(8, 1), (4, 2), (1, 8)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny UNet of 64 channels (its 3x3x64x64 convolutions are above the FSDP size threshold, so they are
    split) with random parameters, perturbed so that no layer is zero and the samples depend on all of them."""
    c = tiny_config()
    c.model.ch = 64
    spec = spec_from_config(c)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda p: np.asarray(p) + 0.05 * rng.standard_normal(p.shape).astype(np.float32),
                          spec.init_params(jax.random.key(0)))
    return models.save(str(tmp_path_factory.mktemp("mesh") / "model"), spec, params)


@pytest.fixture(scope="module")
def one_device(model_dir):
    """The truth: the model on one device, its float x_0 with DDIM (eta = 0.5) and DPM-Solver++(2M)."""
    return _decoded(loading.load_model(model_dir, devices=jax.devices()[:1]))


def _decoded(model):
    x_T = ex.latents(model, 0, 8, seed=1)
    return {"ddim": gather_rows(ex.decode(model, x_T, 4, eta=0.5, key=jax.random.key(2))),
            # on trailing, the spacing the 2e-5 tolerance was set on (on its default, exponential, the meshes'
            # round-off reaches 3.5e-5 in one pixel of 512)
            "dpmpp_2m": gather_rows(ex.decode(model, x_T, 4, solver="dpmpp_2m", spacing="trailing"))}


def run_cli(*args):
    sample.FLAGS.unparse_flags()
    sample.FLAGS(["sample.py", *args])
    sample.run()


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_parameters_sample_the_images_of_one_device(model_dir, one_device, shape):
    model = loading.load_model(model_dir, mesh=shape)
    assert model.mesh.axis_names == ("data", "fsdp") and model.mesh.devices.shape == shape
    data, fsdp = shape
    # Each array split as training splits it (or whole when small); with fsdp > 1 the convolutions are split.
    specs = [x.sharding.spec for x in jax.tree.leaves(model.params)]
    assert specs == [fsdp_spec(x.shape, fsdp) for x in jax.tree.leaves(model.params)]
    big = [x for x in jax.tree.leaves(model.params) if x.size >= FSDP_MIN_SIZE]
    assert len(big) >= 4
    for x in big:
        assert x.addressable_shards[0].data.size == x.size // fsdp
    assert ex.latents(model, 0, 8, seed=1).addressable_shards[0].data.shape == (1, 8, 8, 1)  # a row per device
    got = _decoded(model)
    for solver, want in one_device.items():
        assert want.shape == (8, 8, 8, 1) and want.std() > 0.1  # images, not a constant
        np.testing.assert_allclose(got[solver], want, atol=2e-5, err_msg=f"{solver} on mesh {shape}")


def test_sample_mode_on_a_mesh_writes_the_images_of_one_device(model_dir, tmp_path):
    run_cli(f"--checkpoint={model_dir}", "--mesh=1,-1", "--num_samples=10", "--batch_size=8", "--steps=4",
            "--eta=0.5", f"--output={tmp_path / 'out'}")
    got = np.load(tmp_path / "out" / "samples.npy")
    one = loading.load_model(model_dir, devices=jax.devices()[:1])
    want = ex.generate(one, 10, 8, 4, eta=0.5, progress=False)
    assert got.shape == want.shape == (10, 8, 8, 1) and want.std() > 10
    assert np.abs(got.astype(int) - want).max() <= 1 and np.mean(got == want) > 0.99  # float32 round-off only
    # The other experiments take the mesh too (here DDIM's trajectory of predicted x0).
    a, b = ex.sequence(loading.load_model(model_dir, mesh=(1, 8)), 3, 4, columns=2), ex.sequence(one, 3, 4, columns=2)
    assert a.shape == (3, 3, 8, 8, 1) and np.abs(a.astype(int) - b).max() <= 1 and np.mean(a == b) > 0.99


@pytest.mark.parametrize("flag,match", [
    ("--mesh=3,2", r"^--mesh must be \(data, fsdp\): two positive integers whose product is the number of devices "
                   r"\(8\).*; got \(3, 2\)$"),
    ("--mesh=8", r"^--mesh must be .*; got \(8,\)$"),
    ("--mesh=0,8", r"^--mesh must be .*; got \(0, 8\)$"),
    ("--mesh=-1,-1", r"^--mesh must be .*; got \(-1, -1\)$"),
    ("--mesh=-1,3", r"^--mesh must be .*; got \(-1, 3\)$"),
    ("--mesh=four,2", r"^--mesh must be .*; got \('four', 2\)$"),
])
def test_a_bad_mesh_is_refused_in_one_line_before_anything_is_written(model_dir, tmp_path, flag, match):
    with pytest.raises(ValueError, match=match):
        run_cli(f"--checkpoint={model_dir}", flag, f"--output={tmp_path / 'out'}")
    assert not (tmp_path / "out").exists()


def test_a_batch_that_does_not_divide_and_pipelines_split_over_fsdp_are_refused(model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"^batch_size must be a positive multiple of the number of devices \(8\); "
                                         r"got 4$"):
        run_cli(f"--checkpoint={model_dir}", "--mesh=4,2", "--batch_size=4", "--num_samples=4", "--steps=2",
                f"--output={tmp_path / 'out'}")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"^--mesh=4,2: --mode=text2img runs on one device \(fsdp = 1\); --mesh "
                                         r"with fsdp > 1 applies to the sample, consistency, .*fid modes$"):
        run_cli(f"--checkpoint={model_dir}", "--mode=text2img", "--mesh=4,2", f"--output={tmp_path / 'out'}")
    assert not (tmp_path / "out").exists()
