"""Class-conditional models end to end: labelled data, label dropout in the train step, the spec's
null label, sampling with labels and guidance through the experiments and sample.py.

The guidance arithmetic itself is checked against the closed-form conditional oracle in
tests/test_guidance.py; here the question is whether labels and guidance reach the network.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_params, tiny_config

from ddim_jax import data as data_lib
from ddim_jax import experiments as ex
from ddim_jax import loading, models, training
from ddim_jax.config import spec_from_config, validate_config
from ddim_jax.parallel import BATCH_AXES, make_mesh, replicated, shard_rows
from ddim_jax.training.run import build


def cond_config(**training_overrides):
    c = tiny_config(**training_overrides)
    c.model.num_classes = 10
    return c


# The module's run: on one device, with p_uncond = 0.5, so that its compiled initialiser and train step are
# the ones test_conditional_run_exports_a_spec_with_a_null_label_and_only_used_rows_learn steps by hand.
RUN = dict(p_uncond=0.5)


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cond") / "run"
    training.train(cond_config(num_steps=4, **RUN), str(workdir), progress=False, devices=jax.devices()[:1])
    return workdir


def labelled_params(workdir):
    """The run's spec and params with every parameter perturbed: after 4 steps of EMA (and DDPM's
    zero-initialised output convolutions) the labels barely change the output, and these tests ask
    whether the labels reach the network."""
    spec, params = loading.load(str(workdir))
    rng = np.random.default_rng(1)  # numpy's: jax.random would compile a program per parameter shape
    return spec, jax.tree.map(lambda p: np.asarray(p) + 0.1 * rng.standard_normal(p.shape).astype(np.float32), params)


# ------------------------------------------------------------------------------------------------
# Data and config.


def test_folder_classes_come_from_sub_folders(tmp_path):
    from PIL import Image

    for name, count in (("zebra", 2), ("ant", 1), ("cat", 3)):
        (tmp_path / name / "deeper").mkdir(parents=True)
        for i in range(count):  # nested files belong to their top-level sub-folder
            where = tmp_path / name / ("deeper" if i == 2 else "")
            Image.fromarray(np.full((6, 6, 3), 40 * i, np.uint8)).save(where / f"{i}.png")
    src = data_lib.load_folder(str(tmp_path), 4)
    assert src.class_names == ("ant", "cat", "zebra") and src.num_classes == 3
    # Files sorted by path: ant/0, cat/0, cat/1, cat/deeper/2, zebra/0, zebra/1.
    np.testing.assert_array_equal(src.labels, [0, 1, 1, 1, 2, 2])
    images, labels = src.get_labelled([5, 0])
    assert images.shape == (2, 4, 4, 3) and labels.tolist() == [2, 0]
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(tmp_path / "loose.png")  # an image outside any class
    loose = data_lib.load_folder(str(tmp_path), 4)
    assert loose.num_classes is None and len(loose) == 7
    with pytest.raises(ValueError, match="has no class labels"):
        loose.get_labelled([0])


def test_digits_labels_are_scikit_learns_and_tfds_labels_are_read(tmp_path):
    from sklearn.datasets import load_digits

    src = data_lib.make_source(tiny_config().data)
    images, labels = data_lib.process_batch(src, 32, 3, 0, 0, 1, labelled=True)
    idx = data_lib.batch_indices(len(src), 32, 3, 0)
    np.testing.assert_array_equal(labels, load_digits().target[idx])
    np.testing.assert_array_equal(images, src.get(idx))
    tfds = pytest.importorskip("tensorflow_datasets")
    c = tiny_config()
    c.data.update(dataset="cifar10", image_size=8, channels=3, crop="none")
    with tfds.testing.mock_data(num_examples=12):
        t_src = data_lib.make_source(c.data)
        images, labels = t_src.get_labelled(range(12))
    assert t_src.num_classes == 10 and labels.dtype == np.int32 and labels.shape == (12,)
    assert images.shape == (12, 8, 8, 3) and set(labels.tolist()) <= set(range(10))


@pytest.mark.parametrize("field, value, message", [
    ("model.num_classes", 0, "model.num_classes must be None"),
    ("model.num_classes", True, "model.num_classes must be None"),
    ("training.p_uncond", 1.0, r"training.p_uncond must be a number in \[0, 1\)"),
    ("training.p_uncond", float("nan"), r"training.p_uncond must be a number in \[0, 1\)"),
    ("training.p_uncond", -0.1, r"training.p_uncond must be a number in \[0, 1\)"),
])
def test_bad_conditioning_fields_are_refused(field, value, message):
    c = cond_config()
    block, name = field.split(".")
    c[block][name] = value
    with pytest.raises(ValueError, match=message):
        validate_config(c)


def test_conditional_training_refuses_unlabelled_or_larger_label_sets(tmp_path):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for i in range(4):
        Image.fromarray(np.full((6, 6, 3), 9 * i, np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(tmp_path / "imgs" / "loose.png")
    c = cond_config()
    c.data.update(dataset="folder", folder=str(tmp_path / "imgs"), channels=3)
    with pytest.raises(ValueError, match="needs class labels, and dataset 'folder:.*' has none"):
        training.train(c, str(tmp_path / "a"), progress=False)
    c = cond_config()
    c.model.num_classes = 4  # the digits have 10
    with pytest.raises(ValueError, match=r"model.num_classes=4 but dataset 'digits' has 10 classes"):
        training.train(c, str(tmp_path / "b"), progress=False)
    assert not (tmp_path / "a" / "config.json").exists() and not (tmp_path / "b" / "config.json").exists()


# ------------------------------------------------------------------------------------------------
# The train step.


class _DropProbe:
    """A stand-in network ``out = w * (y == null)``: with x0-prediction of all-white images (x0 = 1) and
    w = 0, each example's loss gradient in w is -2 * [its label was dropped], so the step's reported
    gradient norm is twice the share of labels dropped to the null label."""

    def __init__(self, null):
        self.null = null

    def apply(self, variables, x, t, y, train=False, rngs=None):
        return variables["params"]["w"] * (y == self.null).astype(x.dtype)[:, None, None, None] * jnp.ones_like(x)


@pytest.mark.parametrize("p_uncond", [0.0, 0.25])
def test_labels_are_dropped_to_the_null_label_at_rate_p_uncond(p_uncond):
    c = cond_config(p_uncond=p_uncond, batch_size=256, lr=1e-9)
    c.diffusion.prediction_type = "x0"
    c.data.random_flip = False
    mesh = make_mesh(jax.devices()[:4])
    spec = spec_from_config(c)
    assert spec.null_label == (10 if p_uncond else None)
    probe = _DropProbe(10)  # with p_uncond = 0 no label is ever 10
    step = training.make_train_step(build(c), mesh, model=probe)
    params = {"w": jnp.zeros(())}

    def fresh_state():  # distinct buffers for every leaf: the step donates its state
        z = lambda: np.zeros((), np.int32)  # noqa: E731
        return jax.device_put(training.TrainState(
            step=z(), params={"w": np.float32(0)}, ema_params={"w": np.float32(0)},
            opt_state=jax.tree.map(np.asarray, training.make_optimizer(c).init(params)),
            nonfinite_in_a_row=z(), nonfinite_total=z()), replicated(mesh))

    state = fresh_state()
    sharding = step.batch_sharding
    images = jax.device_put(np.full((3, 256, 8, 8, 1), 255, np.uint8), sharding)
    labels = jax.device_put(np.tile(np.arange(256, dtype=np.int32) % 10, (3, 1)), sharding)
    shares = []
    for _ in range(2):
        state, m = step(state, images, labels)
        shares += list(np.asarray(m["grad_norm"]) / 2)
    assert len(shares) == 6 and (p_uncond == 0 or len(set(np.round(shares, 6))) > 1)  # fresh draws each step
    sd = np.sqrt(0.25 * 0.75 / 256)
    np.testing.assert_allclose(np.mean(shares), p_uncond, atol=4 * sd / np.sqrt(6) + 1e-6)
    with pytest.raises(ValueError, match="needs labels"):
        step(state, images)


def test_conditional_run_exports_a_spec_with_a_null_label_and_only_used_rows_learn(cond_run, tmp_path):
    spec, params = loading.load(str(cond_run))
    assert (spec.num_classes, spec.null_label, spec.num_labels) == (10, 10, 11)
    assert params["class_embed"]["embedding"].shape == (11, 128)
    saved = json.loads((cond_run / "model" / "spec.json").read_text())["spec"]
    assert saved["num_classes"] == 10 and saved["null_label"] == 10
    # A run on digits 3 only (a one-class folder would do too): the embedding rows of the other
    # classes receive no gradient, so Adam leaves them at their initial values; 3 and the null row move.
    c = cond_config(num_steps=2, **RUN)
    mesh = make_mesh(jax.devices()[:1])
    run = build(c)
    state = training.init_state(run, mesh)
    before = np.asarray(state.params["class_embed"]["embedding"])
    step = training.state.cached_train_step(run, mesh)  # the run's step: its config differs only in num_steps
    src = data_lib.make_source(c.data)
    imgs, _ = data_lib.process_batch(src, 16, 0, 0, 0, 1, labelled=True)
    rows = jax.sharding.NamedSharding(step.mesh, jax.sharding.PartitionSpec(None, BATCH_AXES))
    # Two steps: the first moves only conv_out (initialised to zero, it passes no gradient back).
    for _ in range(2):
        state, _ = step(state, jax.device_put(imgs[None], rows), jax.device_put(np.full((1, 16), 3, np.int32), rows))
    moved = np.flatnonzero(np.any(np.asarray(state.params["class_embed"]["embedding"]) != before, axis=1))
    assert moved.tolist() == [3, 10]


# ------------------------------------------------------------------------------------------------
# The spec and sampling.


def test_spec_null_label_rules_and_old_specs_load(cond_run):
    spec, _ = loading.load(str(cond_run))
    with pytest.raises(ValueError, match="null_label must be None or num_classes"):
        dataclasses.replace(spec, null_label=3)
    with pytest.raises(ValueError, match="null_label must be None or num_classes"):
        dataclasses.replace(spec, num_classes=None)
    d = spec.to_dict()
    d.pop("null_label")  # a spec written before null labels existed: no null label
    old = models.ModelSpec.from_dict(d)
    assert old.null_label is None and old.num_labels == 10
    assert old.architecture() != spec.architecture()  # 10 vs 11 embedding rows


def test_spec_eps_fn_labels_guidance_and_the_null_label(cond_run):
    spec, params = labelled_params(cond_run)
    net = spec.build()
    x = np.random.default_rng(0).standard_normal((4, 8, 8, 1)).astype(np.float32)
    t = np.array([5, 50, 80, 99], np.int32)
    y = np.array([0, 3, 9, 3], np.int32)
    # Each network call is one jitted program (called eagerly, the UNet compiled a program per operation).
    direct = jax.jit(lambda params, labels: net.apply({"params": params}, x, t, labels))
    call = jax.jit(lambda eps_fn: eps_fn(x, t))  # eps_fn: a pytree (its params, labels and scale are leaves)
    cond, uncond = np.asarray(direct(params, y)), np.asarray(direct(params, np.full((4,), 10, np.int32)))
    np.testing.assert_array_equal(call(spec.eps_fn(params, y)), cond)
    np.testing.assert_array_equal(call(spec.eps_fn(params)), uncond)  # None: unconditional
    assert float(np.max(np.abs(cond - uncond))) > 1e-3
    for scale in (0.0, 1.0, 2.5):
        np.testing.assert_allclose(call(spec.eps_fn(params, y, scale)), uncond + scale * (cond - uncond),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        spec.eps_fn(params, np.array([10]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        spec.eps_fn(params, -1)
    with pytest.raises(ValueError, match="guidance needs labels"):
        spec.eps_fn(params, None, 2.0)
    no_null = dataclasses.replace(spec, null_label=None)
    with pytest.raises(ValueError, match="no null label"):
        no_null.eps_fn(params)
    uncond_spec = spec_from_config(tiny_config())
    with pytest.raises(ValueError, match="unconditional: labels and guidance do not apply"):
        uncond_spec.eps_fn(uncond_spec.param_shapes(), 3)


def test_guided_sampling_follows_the_labels_and_a_new_scale_does_not_recompile(cond_run):
    model = ex.Model(*labelled_params(cond_run), make_mesh(jax.devices()[:1]))
    labels = ex.class_labels(model, "all", 12)
    assert labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert ex.class_labels(model, [7, 2], 5).tolist() == [7, 2, 7, 2, 7]
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        ex.class_labels(model, [11], 3)
    x_T = ex.latents(model, 0, 8, seed=0)
    y, _ = shard_rows(labels[:8], model.mesh)
    from ddim_jax import solvers

    outs = {}
    for scale in (1.0, 3.0, 0.0):
        outs[scale] = np.asarray(ex.decode(model, x_T, 3, y=y, guidance=scale, solver="dpmpp_2m"))
        if scale == 1.0:
            programs = solvers._dpmpp_scan._cache_size()
    assert solvers._dpmpp_scan._cache_size() == programs, "a new guidance scale recompiled the sampler"
    plain = np.asarray(ex.decode(model, x_T, 3, y=y, solver="dpmpp_2m"))
    np.testing.assert_allclose(outs[1.0], plain, atol=1e-5)  # scale 1 = the conditional model
    uncond = np.asarray(ex.decode(model, x_T, 3, solver="dpmpp_2m"))  # no labels: the null label
    np.testing.assert_allclose(outs[0.0], uncond, atol=1e-5)  # scale 0 = the unconditional model
    assert np.abs(outs[3.0] - plain).max() > 1e-4


def test_sample_py_writes_labels_and_names_its_settings(cond_run, tmp_path):
    import sample

    def run(*args):
        sample.FLAGS.unparse_flags()
        sample.FLAGS(["sample.py", f"--workdir={cond_run}", "--num_samples=5", "--steps=2", "--batch_size=8", *args])
        sample.run()

    run("--labels=4,1", "--guidance=2", "--solver=dpmpp_2m")
    out = cond_run / "sample_dpmpp_2m_labels4-1_g2"
    assert np.load(out / "labels.npy").tolist() == [4, 1, 4, 1, 4]
    assert np.load(out / "samples.npy").shape == (5, 8, 8, 1)
    run(f"--output={tmp_path / 'all'}")
    assert np.load(tmp_path / "all" / "labels.npy").tolist() == [0, 1, 2, 3, 4]
    run(f"--output={tmp_path / 'none'}", "--labels=none")
    assert not (tmp_path / "none" / "labels.npy").exists()
    for args, message in ((["--labels=10"], r"--labels must be classes in \[0, 10\)"),
                          (["--labels=a,b"], "--labels must be 'all', 'none' or comma-separated"),
                          (["--labels=none", "--guidance=2"], "--guidance needs classes"),
                          (["--guidance=inf"], "--guidance must be a finite number"),
                          (["--mode=reconstruction", "--guidance=2"], "reconstruction encodes")):
        with pytest.raises(ValueError, match=message):
            run(f"--output={tmp_path / 'bad'}", *args)
    assert not (tmp_path / "bad").exists()


def test_sample_py_refuses_labels_for_an_unconditional_model(tmp_path):
    import sample

    spec = spec_from_config(tiny_config())  # an unconditional model; any weights, nothing is sampled
    models.save(str(tmp_path / "model"), spec, random_params(spec.param_shapes()))
    for args in (["--labels=3"], ["--guidance=2"]):
        sample.FLAGS.unparse_flags()
        sample.FLAGS(["sample.py", f"--checkpoint={tmp_path / 'model'}", "--num_samples=2", "--steps=2", *args])
        with pytest.raises(ValueError, match="apply to class-conditional models; this model is unconditional"):
            sample.run()
