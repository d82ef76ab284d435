"""Parameters sharded over the mesh (FSDP, ``training.mesh``): how arrays are split, the mesh's checks,
the same training on every mesh shape as on one device, and checkpoints restored onto other meshes
and device counts. In this process's 8 CPU devices (conftest.py)."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from ddim_jax import data as data_lib
from ddim_jax import training
from ddim_jax.config import mesh_shape, to_dict, validate_config
from ddim_jax.parallel import BATCH_AXES, FSDP_MIN_SIZE, fsdp_spec, fsdp_specs, gather_host_tree, train_mesh
from ddim_jax.training import checkpoints, memory
from ddim_jax.training.run import build
from ddim_jax.training.memory import GiB
from ddim_jax.training.state import abstract_state, init_state

P = jax.sharding.PartitionSpec
MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]
STEPS = 5


def test_arrays_split_along_their_largest_divisible_axis_and_small_ones_stay_whole():
    assert fsdp_spec((3, 3, 64, 128), 4) == P(None, None, None, "fsdp")
    assert fsdp_spec((256, 64), 4) == P("fsdp")
    assert fsdp_spec((128, 128), 8) == P(None, "fsdp")  # equals: the last
    assert fsdp_spec((3, 3, 96, 130), 4) == P(None, None, "fsdp")  # 130 does not divide: the next largest
    assert fsdp_spec((3, 3, 1365, 5), 4) == P()  # large, but no axis divides
    assert fsdp_spec((FSDP_MIN_SIZE // 8, 4), 4) == P()  # below the threshold
    assert fsdp_spec((FSDP_MIN_SIZE // 4, 4), 4) == P("fsdp")  # at it
    assert fsdp_spec((4096, 4096), 1) == P()  # fsdp = 1: replicated


def test_the_mesh_field_is_checked_in_one_line():
    assert mesh_shape((-1, 1), 8) == (8, 1) and mesh_shape((-1, 4), 8) == (2, 4) and mesh_shape([2, -1], 8) == (2, 4)
    assert mesh_shape((4, 2), 8) == (4, 2)
    for bad in [(3, 2), (-1, 3), (0, 8), (-1, -1), (8,), (4, 2, 1), "4x2", (4.0, 2), (True, 8)]:
        with pytest.raises(ValueError, match=r"^training.mesh must be \(data, fsdp\): two positive integers whose "
                                             r"product is the number of devices \(8\).*; got "):
            mesh_shape(bad, 8)
    c = tiny_config()
    c.training.mesh = (2, 2)
    with pytest.raises(ValueError, match=r"^training.mesh must be .*number of devices \(8\)"):
        validate_config(c, 8)
    validate_config(c, 4)


class _Net(nn.Module):
    """A small denoiser of 8x8x1 images: two kernels above the FSDP size threshold, split along either axis,
    and two biases below it (the sharded step's arithmetic at a compile time the suite can afford)."""

    @nn.compact
    def __call__(self, x, t, y=None, train=False):
        b = x.shape[0]
        h = nn.Dense(256)(x.reshape(b, -1)) + t[:, None].astype(jnp.float32) / 100.0  # 64x256: split on its last
        return nn.Dense(64)(nn.silu(h)).reshape(x.shape)  # 256x64: split on its first


def _fresh_state(c, params):
    """A train state of ``params`` on the host (fresh buffers: the step donates its state)."""
    z = lambda: np.zeros((), np.int32)  # noqa: E731
    params = jax.tree.map(np.asarray, params)
    return training.TrainState(step=z(), params=params, ema_params=jax.tree.map(np.copy, params),
                               opt_state=jax.tree.map(np.asarray, training.make_optimizer(c).init(params)),
                               nonfinite_in_a_row=z(), nonfinite_total=z())


def _place(state, mesh):
    return jax.device_put(state, jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), fsdp_specs(state, mesh)))


@pytest.fixture(scope="module")
def runs():
    """5 steps of the same batches on one device and on each mesh of the 8 devices: (losses, grad norms,
    whole state on the host, the state as trained, the mesh)."""
    c = tiny_config(grad_clip=0.05)  # clipped: the whole gradient's norm decides
    run, net = build(c), _Net()
    init = jax.jit(net.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32))["params"]
    params = jax.tree.map(np.asarray, init)  # on the host: no eager op compiles a program for it
    src = data_lib.make_source(c.data)
    batches = [data_lib.process_batch(src, 16, s, 0, 0, 1)[None] for s in range(STEPS)]
    out = {}
    for shape in [(1, 1)] + MESHES:
        mesh = train_mesh(jax.devices()[:shape[0] * shape[1]], shape)
        step = training.make_train_step(run, mesh, model=net)
        state = _place(_fresh_state(c, params), mesh)
        rows = jax.sharding.NamedSharding(mesh, P(None, BATCH_AXES))
        losses, norms = [], []
        for b in batches:
            state, m = step(state, jax.device_put(b, rows))
            losses.append(float(np.asarray(m["loss"])[0]))
            norms.append(float(np.asarray(m["grad_norm"])[0]))
        out[shape] = losses, norms, gather_host_tree((state.params, state.ema_params, state.opt_state)), state, mesh
    return c, params, step, out


def test_every_mesh_trains_like_one_device(runs):
    c, init, _, out = runs
    ref_losses, ref_norms, ref, _, _ = out[(1, 1)]
    assert min(ref_norms) > 2 * c.training.grad_clip  # every update was clipped
    atol = 0.05 * c.training.lr  # Adam and round-off in the reductions' order (test_training.adam_atol)
    moved = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(ref[0]), jax.tree.leaves(init)))
    assert moved > 20 * atol, moved  # it trained, by far more than the tolerance
    for shape in MESHES:
        losses, norms, state, _, _ = out[shape]
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=str(shape))
        np.testing.assert_allclose(norms, ref_norms, rtol=1e-5, err_msg=str(shape))  # the whole gradient's norm
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(ref)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=atol, err_msg=f"{shape} {jax.tree_util.keystr(path)}")


def test_params_ema_and_adam_moments_live_in_shards(runs):
    *_, out = runs
    state = out[(2, 4)][3]
    specs = jax.tree.map(lambda x: fsdp_spec(x.shape, 4), state.params)
    split = [s for s in jax.tree.leaves(specs) if s != P()]
    assert set(split) == {P("fsdp"), P(None, "fsdp")} and len(split) < len(jax.tree.leaves(specs))
    adam = state.opt_state[1][0]
    for tree in (state.params, state.ema_params, adam.mu, adam.nu):
        for x, spec in zip(jax.tree.leaves(tree), jax.tree.leaves(specs)):
            want = [n // 4 if name == "fsdp" else n for n, name in zip(x.shape, tuple(spec) + (None,) * x.ndim)]
            assert x.addressable_shards[0].data.shape == tuple(want)
    # The (8, 1) mesh is plain data parallelism: everything whole on every device.
    assert all(x.is_fully_replicated for x in jax.tree.leaves(out[(8, 1)][3]))


def test_gradients_are_reduce_scattered_not_all_reduced(runs):
    c, params, _, out = runs
    text = {}
    for shape in [(8, 1), (2, 4)]:
        mesh = out[shape][4]
        step = training.make_train_step(build(c), mesh, model=_Net())
        rows = jax.sharding.NamedSharding(mesh, P(None, BATCH_AXES))
        images = jax.ShapeDtypeStruct((1, 16, 8, 8, 1), jnp.uint8, sharding=rows)
        labels = jax.ShapeDtypeStruct((1, 16), jnp.int32, sharding=rows)
        text[shape] = step.lower(_place(_fresh_state(c, params), mesh), images, labels, {}).as_text()
    assert "reduce_scatter" in text[(2, 4)] and "all_gather" in text[(2, 4)]
    assert "reduce_scatter" not in text[(8, 1)] and "all_gather" not in text[(8, 1)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny run's initial state made on the (4, 2) mesh (its large kernels split in two), checkpointed
    at step 4 as the training loop does: (config, workdir, the state)."""
    workdir = tmp_path_factory.mktemp("fsdp_run")
    c = tiny_config(num_steps=4, checkpoint_every=4)
    c.training.mesh = (4, 2)
    run = build(c)
    state = init_state(run, train_mesh(jax.devices(), (4, 2)))
    ckpt = checkpoints.Checkpointer(str(workdir), keep=3)
    try:
        ckpt.save(state, {"step": 4, "data_position": 4, "seed": 0, "global_batch": 16, "config": to_dict(c),
                          "record": run.record.to_dict()})
        ckpt.wait()
        ckpt.seal(4)
    finally:
        ckpt.close()
    return c, workdir, state


def test_checkpoints_restore_onto_other_meshes_and_device_counts_bit_for_bit(saved):
    c, workdir, written = saved
    assert any(not x.is_fully_replicated for x in jax.tree.leaves(written.params))
    whole = gather_host_tree(written)
    ckpt = checkpoints.Checkpointer(str(workdir), keep=3, create=False)
    try:
        ckpt.verify(4)
        for devices, shape in [(8, (8, 1)), (4, (1, 4)), (1, (1, 1))]:
            mesh = train_mesh(jax.devices()[:devices], shape)
            state = ckpt.restore_state(4, abstract_state(build(c), mesh))
            assert {x.sharding.mesh.devices.shape for x in jax.tree.leaves(state)} == {shape}
            assert any(not x.is_fully_replicated for x in jax.tree.leaves(state.params)) == (shape[1] > 1)
            for a, b in zip(jax.tree.leaves(gather_host_tree(state)), jax.tree.leaves(whole)):
                np.testing.assert_array_equal(a, b)
        # Resuming on another mesh is a change a resumed run may make: its newest checkpoint is restored onto it.
        other = tiny_config(num_steps=8, checkpoint_every=4)
        other.training.mesh = (1, 2)
        state, meta = checkpoints.resume(ckpt, build(other), train_mesh(jax.devices()[:2], (1, 2)),
                                         allow_config_change=False)
        assert meta["step"] == 4 and meta["config"]["training"]["mesh"] == [4, 2]
        for a, b in zip(jax.tree.leaves(gather_host_tree(state)), jax.tree.leaves(whole)):
            np.testing.assert_array_equal(a, b)
    finally:
        ckpt.close()


def test_the_memory_plan_counts_each_devices_shards(saved):
    c, _, written = saved
    planned = abstract_state(build(c), train_mesh(jax.devices(), (4, 2)))
    held = lambda tree: sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    for name in ("params", "ema_params", "opt_state"):
        got, want = memory.device_bytes(getattr(planned, name)), held(getattr(written, name))
        assert got == want < sum(x.nbytes for x in jax.tree.leaves(getattr(written, name))), name
    plan = memory.MemoryPlan(params=2 * GiB, ema=2 * GiB, optimizer=4 * GiB, batch=0, temporaries=GiB, limit=8 * GiB,
                             device="gpu:0", mesh=(8, 2))
    assert plan.summary().startswith("memory per device (gpu:0), mesh data 8 x fsdp 2: 9.00 GiB of 8.00 GiB")
    with pytest.raises(ValueError, match=r"gpu:0 has 8.00 GiB: try a smaller training.batch_size \(or more devices\), "
                                         r"or training.mesh=\(4, 4\) \(params, EMA and Adam state split over 4 "
                                         r"devices\), or training.remat=True"):
        memory.check_fits(plan, c)


def test_training_previews_sample_with_the_params_split_on_the_training_mesh(tmp_path, monkeypatch):
    """A preview grid during a training.mesh = (-1, 2) run samples on that mesh, from the EMA params as they are
    split there (not gathered whole onto each device), and draws the images the exported model draws on one
    device."""
    from ddim_jax import experiments, loading
    from ddim_jax.parallel import make_mesh
    from ddim_jax.training import loop

    seen, grids = [], []
    post_init = experiments.Model.__post_init__

    def spy(model):
        given = any(not x.is_fully_replicated for x in jax.tree.leaves(model.params))
        post_init(model)
        seen.append((tuple(model.mesh.devices.shape), given,
                     any(not x.is_fully_replicated for x in jax.tree.leaves(model.params))))

    monkeypatch.setattr(experiments.Model, "__post_init__", spy)
    monkeypatch.setattr(loop, "save_grid", lambda images, *a, **k: grids.append(np.asarray(images)))
    c = tiny_config(num_steps=2, log_every=2, checkpoint_every=2, sample_every=2, sample_steps=2)
    c.training.mesh = (-1, 2)
    training.train(c, str(tmp_path), progress=False)
    assert seen == [((4, 2), True, True)] and len(grids) == 1  # on the (4, 2) mesh, split as trained
    spec, params = loading.load(str(tmp_path))  # the EMA model exported at step 2, which the preview drew
    monkeypatch.setattr(experiments.Model, "__post_init__", post_init)
    one = experiments.Model(spec, params, make_mesh(jax.devices()[:1]))
    want = experiments.generate(one, 4, 4, 2, seed=c.training.seed + 1, progress=False)
    assert np.abs(grids[0].astype(int) - want).max() <= 1  # uint8 images, to float32 round-off


def test_a_single_process_save_writes_each_replicated_array_without_compiling_slices(tmp_path, caplog):
    """In one process, each replicated array is written from one device: orbax's replica-parallel default
    would compile a slice program per array shape and device (8 here) on the first save."""
    mesh = train_mesh(jax.devices(), (8, 1))
    whole = {"a": np.arange(8 * 77, dtype=np.float32).reshape(8, 77), "b": np.full((24, 5), 3.0, np.float32)}
    state = _place(_fresh_state(tiny_config(), whole), mesh)
    assert all(x.is_fully_replicated for x in jax.tree.leaves(state))
    ckpt = checkpoints.Checkpointer(str(tmp_path), keep=1)
    try:
        with jax.log_compiles(), caplog.at_level(logging.WARNING, logger="jax"):
            ckpt.save(state, {"step": 1, "config": {}})
            ckpt.wait()
        compiled = [r.getMessage() for r in caplog.records if "Finished XLA compilation of" in r.getMessage()]
        assert not [m for m in compiled if "slice" in m], compiled
        restored = ckpt.restore_state(1, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                                    sharding=x.sharding), state))
        for a, b in zip(jax.tree.leaves(gather_host_tree(restored)), jax.tree.leaves(gather_host_tree(state))):
            np.testing.assert_array_equal(a, b)
    finally:
        ckpt.close()
