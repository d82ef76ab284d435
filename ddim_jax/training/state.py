"""The train state, the optimizer and the sharded train step.

The step is written pmap-style: a per-device function sees its rows of the global batch, computes
gradients, averages gradients and metrics over the devices, and applies the update. It runs under
``jax.jit(jax.shard_map(...))`` on a 2-D ``('data', 'fsdp')`` mesh of every device of every host
(:func:`ddim_jax.parallel.train_mesh`; the form JAX recommends now that ``jax.pmap`` is in maintenance
mode); the batch's rows are split over both axes. With ``fsdp = 1`` the parameters, their EMA and Adam's
state are replicated and the gradients averaged with ``lax.pmean`` (data parallelism). With ``fsdp > 1``
each large array of the state is split over ``'fsdp'`` (:func:`ddim_jax.parallel.fsdp_spec`, one place):
the step all-gathers the parameters over ``'fsdp'`` for the forward and backward passes, reduce-scatters
the gradients back to shards (``lax.psum_scatter``), averages them over ``'data'``, and updates Adam's
moments, the parameters and the EMA on the shards; the gradient norm (clipping, the non-finite check, the
logs) is the whole gradient's, summed over the shards.

Randomness is stateless: example ``i`` of the global batch at step ``s`` draws its timestep, noise and
flip from ``fold_in(fold_in(key(seed), s), i)``, so the losses do not depend on how many devices or
hosts share the batch, nor on the mesh's shape, and a resumed run draws what an uninterrupted one would.
(Dropout masks are drawn per device and do depend on the layout.)
"""

from __future__ import annotations

import functools
import json
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddim_jax.config import RESUMABLE_CHANGES, flatten, to_dict
from ddim_jax.nets import run_once_options
from ddim_jax.parallel import BATCH_AXES, as_train_mesh, fsdp_size, fsdp_specs, spec_axis
from ddim_jax.training.objectives import make_objective


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32, steps taken (skipped non-finite ones included)
    params: Any
    ema_params: Any
    opt_state: Any
    nonfinite_in_a_row: jax.Array
    nonfinite_total: jax.Array


# The optimiser's and the EMA's settings. The train step takes them as arguments of its program, not as constants
# in it: runs that differ only in them share one compiled program, and a run resumed with another lr compiles
# nothing new.
HYPERPARAMETERS = ("lr", "warmup_steps", "grad_clip", "adam_b1", "adam_b2", "ema_decay", "ema_warmup")


def hyperparameters(config) -> dict:
    """``config.training``'s :data:`HYPERPARAMETERS` (``warmup_steps`` at least 1), by name."""
    t = config.training
    return dict({name: t[name] for name in HYPERPARAMETERS}, warmup_steps=max(t.warmup_steps, 1))


def make_optimizer(config, norm=None) -> optax.GradientTransformation:
    """Adam with a linear warmup to ``lr``, after clipping the (device-averaged) gradient's global norm.
    ``norm``: the function of the updates that gives that norm when they are shards of the gradient
    (default: ``optax.tree.norm``, for a whole gradient); the state is the same either way."""
    return _optimizer(hyperparameters(config), norm)


def _optimizer(h: dict, norm=None) -> optax.GradientTransformation:
    """:func:`make_optimizer` of the :func:`hyperparameters` ``h`` (numbers, or arrays inside the train step)."""

    def lr(count):  # update k (0-based) uses lr * min((k + 1) / warmup, 1): the first update is not zero
        return h["lr"] * jnp.minimum((count + 1) / h["warmup_steps"], 1.0)

    clip = (optax.clip_by_global_norm(h["grad_clip"]) if norm is None
            else _clip_by_global_norm(h["grad_clip"], norm))
    return optax.chain(clip, optax.adam(lr, b1=h["adam_b1"], b2=h["adam_b2"]))


def _clip_by_global_norm(max_norm: float, norm) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm``'s rule (and its empty state) with the norm given by ``norm(updates)``."""

    def update(updates, state, params=None):
        g_norm = norm(updates)
        trigger = jnp.squeeze(g_norm < max_norm)
        return jax.tree.map(lambda t: jax.lax.select(trigger, t, (t / g_norm.astype(t.dtype)) * max_norm),
                            updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def ema_decay_at(step, decay, warmup):
    """The EMA decay of update ``step`` (0-based): ``decay``, or with ``warmup`` ``min(decay, (1 + step) /
    (10 + step))`` (TensorFlow's ``num_updates`` rule, as diffusers' EMAModel), so the random initial
    weights weigh 0.999^s in the EMA after s steps without it (5% at 3,000) and vanish fast with it.
    ``decay`` and ``warmup`` may be arrays (the train step's arguments)."""
    decay = jnp.asarray(decay, jnp.float32)
    s = jnp.asarray(step, jnp.float32)
    return jnp.where(warmup, jnp.minimum(decay, (1.0 + s) / (10.0 + s)), decay)


def _init_fn(run):
    objective, tx = run.objective, make_optimizer(run.config)

    def init(key, start=None):  # start: the params a fine-tuning run starts from (ddim_jax.training.finetune)
        params = objective.init(key) if start is None else start
        z = jnp.zeros((), jnp.int32)
        return TrainState(step=z, params=params, ema_params=params, opt_state=tx.init(params),
                          nonfinite_in_a_row=z, nonfinite_total=z)

    return init


def _init_key(run) -> str:
    """What fixes the trainable parameters' shapes: the objective (a LoRA run trains adapters, not the
    network), the model's architecture, the objective's own networks (a discriminator's settings) and the
    adapters' rank and targets. Adam's state starts at zero whatever its settings."""
    c = to_dict(run.config)
    return json.dumps([type(run.objective).__qualname__, run.spec.architecture(), c.get("loss"),
                       c["training"].get("lora")], sort_keys=True)


def _mesh_key(mesh) -> tuple:
    mesh = as_train_mesh(mesh)
    return tuple(d.id for d in mesh.devices.flat), tuple(mesh.devices.shape)


def state_specs(run, mesh) -> TrainState:
    """The PartitionSpec of each array of the train state on ``mesh`` (a 1-D ``'data'`` mesh counts as
    ``fsdp = 1``): :func:`ddim_jax.parallel.fsdp_spec` of its shape, for the parameters, the EMA and
    Adam's moments alike (Adam's step counts are scalars: replicated)."""
    return fsdp_specs(_state_shapes(run), as_train_mesh(mesh))


def state_shardings(run, mesh) -> TrainState:
    mesh = as_train_mesh(mesh)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), state_specs(run, mesh))


def init_state(run, mesh) -> TrainState:
    """The initial state of a :class:`~ddim_jax.training.run.Run`, created directly in its sharding on
    ``mesh`` (compiled once per architecture and mesh): random params, or a fine-tuning run's init model's
    (``run.init_params``)."""
    start = getattr(run, "init_params", None)
    key = (_init_key(run), _mesh_key(mesh), "init" if start is None else "init_from")
    if key not in _CACHE:
        _CACHE[key] = jax.jit(_init_fn(run), out_shardings=state_shardings(run, mesh),
                              compiler_options=run_once_options(mesh.devices.flat[0].platform))
    if start is None:
        return _CACHE[key](jax.random.key(run.config.training.seed))
    return _CACHE[key](jax.random.key(run.config.training.seed), jax.tree.map(jnp.asarray, start))


def abstract_state(run, mesh) -> TrainState:
    """Shapes, dtypes and shardings (:func:`state_specs`) of the train state on ``mesh``, without computing it."""
    return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                        _state_shapes(run), state_shardings(run, mesh))


def _state_shapes(run) -> TrainState:
    """The train state's shapes and dtypes (tracing the network's init once per :func:`_init_key`)."""
    key = (_init_key(run), "shapes")
    if key not in _CACHE:
        _CACHE[key] = jax.eval_shape(_init_fn(run), jax.random.key(0))
    return _CACHE[key]


def _gather(params, specs):
    """The whole parameters from their shards: each split array all-gathered over ``'fsdp'``."""
    return jax.tree.map(lambda x, spec: x if spec_axis(spec) is None else
                        jax.lax.all_gather(x, "fsdp", axis=spec_axis(spec), tiled=True), params, specs)


def _average(grads, value, metrics, specs, fsdp: int):
    """Gradients, loss and metrics averaged over all devices. Replicated arrays' gradients with ``lax.pmean``
    over both axes (with the loss and metrics, in one all-reduce); split arrays' gradients reduce-scattered
    over ``'fsdp'`` to this device's shard, then averaged over ``'data'``."""
    flat, tree = jax.tree.flatten(grads)
    axes = [spec_axis(spec) for spec in tree.flatten_up_to(specs)]
    whole, value, metrics = jax.lax.pmean(([g for g, a in zip(flat, axes) if a is None], value, metrics), BATCH_AXES)
    split = [jax.lax.pmean(jax.lax.psum_scatter(g, "fsdp", scatter_dimension=a, tiled=True), "data") / fsdp
             for g, a in zip(flat, axes) if a is not None]
    whole, split = iter(whole), iter(split)
    return tree.unflatten([next(whole) if a is None else next(split) for a in axes]), value, metrics


def _global_norm(grads, specs):
    """The whole gradient's L2 norm from this device's shards: split arrays' squares summed over ``'fsdp'``."""
    flat, tree = jax.tree.flatten(grads)
    axes = [spec_axis(spec) for spec in tree.flatten_up_to(specs)]
    if all(a is None for a in axes):
        return optax.tree.norm(grads)
    square = lambda xs: sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in xs)  # noqa: E731
    split = jax.lax.psum(square([g for g, a in zip(flat, axes) if a is not None]), "fsdp")
    return jnp.sqrt(square([g for g, a in zip(flat, axes) if a is None]) + split)


def make_train_step(run, mesh, model=None) -> TrainStep:
    """The :class:`TrainStep` of ``run`` (a :class:`~ddim_jax.training.run.Run`) on ``mesh``, with the run's
    :func:`hyperparameters`. ``model`` (default: the run's network) is anything with Flax's ``apply``; the
    loss is the run's objective's (:mod:`ddim_jax.training.objectives`)."""
    config = run.config
    seed, flip = config.training.seed, config.data.random_flip
    objective = run.objective if model is None else make_objective(config, run.spec, model)
    mesh = as_train_mesh(mesh)
    fsdp = fsdp_size(mesh)

    def one_step(state: TrainState, batch, frozen, specs, h):
        """One step on this device's rows and shards; ``specs``: the PartitionSpecs of the state's params;
        ``h``: the :func:`hyperparameters`, as arrays."""
        split = any(spec_axis(s) is not None for s in jax.tree.leaves(specs))
        tx = _optimizer(h, (lambda g: _global_norm(g, specs)) if split else None)
        images, labels = batch
        b = images.shape[0]
        device = jax.lax.axis_index(BATCH_AXES)  # (data, fsdp) row-major: the order of the batch's blocks
        step_key = jax.random.fold_in(jax.random.key(seed), state.step)
        keys = jax.vmap(jax.random.fold_in, (None, 0))(step_key, device * b + jnp.arange(b))
        x0 = images.astype(jnp.float32) / 127.5 - 1.0
        if flip:
            do_flip = jax.vmap(jax.random.bernoulli)(jax.vmap(lambda k: jax.random.fold_in(k, 2))(keys))
            x0 = jnp.where(do_flip[:, None, None, None], x0[:, :, ::-1], x0)
        dropout_key = jax.random.fold_in(jax.random.fold_in(step_key, 1 << 30), device)

        # An objective whose loss reads the EMA network (consistency distillation's target) gets it whole.
        ema = ({"ema": jax.lax.stop_gradient(_gather(state.ema_params, specs))}
               if getattr(objective, "needs_ema", False) else {})

        def loss_fn(params):
            return objective.loss(params, frozen, x0, labels, keys, state.step, dropout_key, **ema)

        (value, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(_gather(state.params, specs))
        metrics = dict({"loss": value}, **metrics)
        grads, value, metrics = _average(grads, value, metrics, specs, fsdp)
        grad_norm = _global_norm(grads, specs)
        finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        d = ema_decay_at(state.step, h["ema_decay"], h["ema_warmup"])
        ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params, params)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = TrainState(
            step=state.step + 1,
            params=keep(params, state.params),
            ema_params=keep(ema, state.ema_params),
            opt_state=keep(opt_state, state.opt_state),
            nonfinite_in_a_row=jnp.where(finite, 0, state.nonfinite_in_a_row + 1),
            nonfinite_total=state.nonfinite_total + jnp.where(finite, 0, 1),
        )
        return new_state, dict(metrics, grad_norm=grad_norm, finite=finite)

    on_cpu = mesh.devices.flat[0].platform == "cpu"

    def device_steps(state, images, labels, frozen, h, specs):
        if not on_cpu:
            return jax.lax.scan(lambda s, b: one_step(s, b, frozen, specs, h), state, (images, labels))
        # XLA:CPU computes convolution filter gradients ~60x slower inside a while loop (a scan of
        # length 1 included), so on CPU the k steps are unrolled into straight-line code.
        metrics = []
        for i in range(images.shape[0]):
            state, m = one_step(state, (images[i], labels[i]), frozen, specs, h)
            metrics.append(m)
        return state, jax.tree.map(lambda *xs: jnp.stack(xs), *metrics)

    rows = P(None, BATCH_AXES)

    def per_device(state, images, labels, frozen, h):  # (its name: the compiled program's, as before the mesh)
        # The state's PartitionSpecs follow from its arrays' shapes (ddim_jax.parallel.fsdp_spec), so a
        # state of any structure (another model's, as the tests give) is split by the same rule.
        specs = fsdp_specs(state, mesh)
        return jax.shard_map(functools.partial(device_steps, specs=specs.params), mesh=mesh,
                             in_specs=(specs, rows, rows, P(), P()), out_specs=(specs, P()),
                             check_vma=False)(state, images, labels, frozen, h)

    return TrainStep(jax.jit(per_device, donate_argnums=0), objective, mesh, {}).with_hyperparameters(config)


class TrainStep:
    """``step(state, images, labels=None, frozen=None) -> (state, metrics)``: ``images`` uint8
    ``[k, global_batch, H, W, C]`` (and, for a class-conditional model, int32 ``labels`` ``[k, global_batch]``)
    sharded over the batch axis (``P(None, BATCH_AXES)`` on ``step.mesh``), k steps in one call; metrics have
    leading dim k. ``frozen``: the parameters used but not trained (a latent model's autoencoder, see
    :mod:`ddim_jax.training.latent`; an autoencoder's LPIPS network, :mod:`ddim_jax.training.perceptual`;
    replicated). ``step.lower(state, images, labels, frozen)`` lowers it ahead of time (``training.memory``).
    ``step.batch_sharding``: the sharding of ``images`` and ``labels`` (a batch placed otherwise, e.g. on the
    1-D mesh the step was made with, compiles the step again)."""

    def __init__(self, jitted, objective, mesh, placeholders, hyper=None):
        self.jitted, self.objective, self.mesh = jitted, objective, mesh
        self.batch_sharding = NamedSharding(mesh, P(None, BATCH_AXES))
        self._placeholders, self._hyper = placeholders, hyper  # placeholders: by shape, made once

    def with_hyperparameters(self, config) -> TrainStep:
        """This step (the same program) with ``config``'s :func:`hyperparameters`, replicated on the mesh."""
        replicated = NamedSharding(self.mesh, P())
        values = {name: np.asarray(v, np.bool_ if name == "ema_warmup" else np.float32)
                  for name, v in hyperparameters(config).items()}
        hyper = {name: jax.make_array_from_callback((), replicated, lambda _, v=v: v) for name, v in values.items()}
        return TrainStep(self.jitted, self.objective, self.mesh, self._placeholders, hyper)

    def arguments(self, state, images, labels=None, frozen=None) -> tuple:
        """The compiled program's arguments for this call (a program from :meth:`lower` takes them)."""
        if self.objective.spec.num_classes is not None and labels is None:
            raise ValueError("this model is class-conditional: the train step needs labels")
        if labels is None:
            shape = images.shape[:2]
            if shape not in self._placeholders:
                self._placeholders[shape] = jnp.zeros(shape, jnp.int32, device=self.batch_sharding)
            labels = self._placeholders[shape]
        if frozen is None:
            if self.objective.frozen_shapes():
                raise ValueError(f"this train step needs the frozen params "
                                 f"{sorted(self.objective.frozen_shapes())} (frozen=)")
            frozen = {}
        return state, images, labels, frozen, self._hyper

    def __call__(self, state, images, labels=None, frozen=None):
        return self.jitted(*self.arguments(state, images, labels, frozen))

    def lower(self, state, images, labels=None, frozen=None):
        """The program lowered for these arguments (arrays or ``jax.ShapeDtypeStruct`` values)."""
        return self.jitted.lower(*self.arguments(state, images, labels, frozen))


# Compiled programs by (config without the fields a resumed run may change, devices and mesh shape, what):
# repeated ``train`` calls in one process (resuming in a notebook, the tests) reuse them.
_CACHE: dict = {}
# Fields the step's program does not depend on (remat may change on resume, but it changes the program;
# training.mesh too, and the key holds the mesh's actual shape instead).
# training.max_nonfinite is the loop's; the hyperparameters are the step's arguments.
_NOT_IN_STEP = (frozenset(RESUMABLE_CHANGES) - {"training.remat"}
                | {"training.max_nonfinite"} | {f"training.{name}" for name in HYPERPARAMETERS})


def cached_train_step(run, mesh) -> TrainStep:
    """``make_train_step`` for this run and mesh, built once per process (and bound to this run's
    hyperparameters)."""
    d = flatten(to_dict(run.config))
    key = (json.dumps([{k: v for k, v in d.items() if k not in _NOT_IN_STEP}, run.record.to_dict()], sort_keys=True),
           _mesh_key(mesh), "step")
    if key not in _CACHE:
        _CACHE[key] = make_train_step(run, mesh)
    return _CACHE[key].with_hyperparameters(run.config)
