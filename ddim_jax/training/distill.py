"""Few-step distillation as training objectives (``training.distill``): progressive distillation (Salimans and
Ho, ICLR 2022) and consistency distillation (Song et al., ICML 2023) of a frozen teacher.

The teacher (``training.distill.teacher``: a model directory or a training workdir's export; pixel or latent,
unconditional or class-conditional) is read as ``training.init_from`` is (:mod:`ddim_jax.training.finetune`):
its spec fills the config's model fields, the student starts as a copy of its weights, and the run record holds
its path and digest. Its network params are frozen (``frozen["teacher"]``); a class-conditional teacher's
output is guided at ``training.distill.guidance`` (None: the conditional output), and the student learns the
guided output for each label (the null label's is the unconditional one). The pure mathematics (targets,
consistency function, metrics) is :mod:`ddim_jax.distillation`'s.

* ``progressive``: rounds of ``round_steps`` training steps; round r trains an N_r-step student, N_0 =
  ``distill.steps``, halving down to ``distill.final_steps``. Its teacher is the given model in round 0 and
  the previous round's student (its EMA params, as exported) afterwards. The student outputs v or x0
  (``distill.prediction_type``), is trained on the x-target of two teacher DDIM steps with the weight
  ``distill.weighting``, and is sampled with DDIM at N_r steps on the ``"trailing"`` timesteps. At the end of
  each round the run exports that round's student to ``workdir/rounds/steps_<N_r>`` (a model directory whose
  spec records its step count and timesteps: ``sample.py --checkpoint=DIR`` samples it at N_r steps); the
  last round's student is also ``workdir/model``. A run resumed mid-round reads that round's teacher from the
  previous round's export; the round is a function of the step.
* ``consistency``: the student's consistency function ``f = c_skip x + c_out x0(network)`` (the spec's
  ``distilled`` record; its prediction type ``"x0"``; its network outputs ``distill.prediction_type``, v or x0,
  whose x0 stays bounded where an eps output's ``(x - sigma eps) / alpha`` blows up at alpha ~ 0) is trained on
  the discretisation of ``distill.steps``
  points with the target network the run's EMA (decay ``training.ema_decay``, the paper's mu: 0.95), the
  teacher's ODE step (``distill.solver``: DDIM, or DPM-Solver++ 2M whose two steps start from the forward
  process two points up) and ``distill.metric``. The exported model is that EMA network. It samples in
  ``distill.sample_steps`` steps by default (one step, or multistep re-noising: :mod:`ddim_jax.distillation`).

The teacher's x0 predictions are clipped to [-1, 1] in pixel space, as the samplers do (not for latents).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax import conditioning, experiments, models
from ddim_jax import distillation as dmath
from ddim_jax.conditioning import Conditioning
from ddim_jax.config import distilling, progressive_rounds
from ddim_jax.diffusion import _bcast, predict_x0_eps
from ddim_jax.models import ModelSpec
from ddim_jax.parallel import round_up
from ddim_jax.schedules import make_timesteps
from ddim_jax.training.inputs import diffusion_inputs, fold

ROUNDS_DIR = "rounds"  # a progressive run's per-round students: workdir/rounds/steps_<N>


def enabled(config) -> bool:
    return bool(distilling(config))


def round_dir(workdir: str, steps: int) -> str:
    return os.path.join(workdir, ROUNDS_DIR, f"steps_{steps}")


def student_spec(config, spec: ModelSpec, teacher_path: str = "", steps: int | None = None) -> ModelSpec:
    """The student's spec: the teacher's (``spec``, from the config the teacher filled) with the student's
    prediction type and its ``distilled`` record (``steps``: a progressive round's count; default the last)."""
    ds = config.training.distill
    T = spec.make_schedule().num_timesteps
    guidance = None if ds.guidance is None else float(ds.guidance)
    common = dict(spacing=dmath.SAMPLE_SPACING, teacher=teacher_path, guidance=guidance)
    if ds.method == "progressive":
        n = int(ds.final_steps if steps is None else steps)
        record = dict(method="progressive", steps=n, timesteps=make_timesteps(T, n, dmath.SAMPLE_SPACING).tolist(),
                      **common)
        return dataclasses.replace(spec, prediction_type=ds.prediction_type, distilled=record)
    n = int(ds.sample_steps)
    record = dict(method="consistency", steps=n, timesteps=make_timesteps(T, n, dmath.SAMPLE_SPACING).tolist(),
                  sigma_data=float(ds.sigma_data), timestep_scaling=float(ds.timestep_scaling), t_min=0,
                  network_prediction=ds.prediction_type, **common)
    return dataclasses.replace(spec, prediction_type="x0", distilled=record)


def check_teacher(config, spec: ModelSpec, path: str) -> None:
    """A teacher the config can distil: not a consistency model, guided only with a null label, a schedule long
    enough for the round's teacher steps."""
    ds = config.training.distill
    if spec.distilled is not None and spec.distilled.get("method") == "consistency":
        raise ValueError(f"training.distill.teacher: {path!r} is a consistency model; distil a diffusion model")
    if ds.guidance is not None and spec.null_label is None:
        raise ValueError(f"training.distill.guidance needs a teacher with a null label (a class-conditional model "
                         f"trained with label dropout); {path!r} has none: set it to None")
    T = spec.make_schedule().num_timesteps
    if ds.method == "progressive" and 2 * ds.steps > T:
        raise ValueError(f"training.distill.steps must be <= {T // 2} (the teacher's T / 2: it takes twice the "
                         f"student's steps); got {ds.steps}")
    if ds.method == "consistency" and ds.steps > T:
        raise ValueError(f"training.distill.steps must be <= the teacher's T ({T}); got {ds.steps}")


class _Distill:
    """What both objectives share: the latent encoding, the labels, the teacher's guided x0-prediction."""

    def __init__(self, config, spec: ModelSpec, model):
        self.config, self.spec, self.model = config, spec, model
        self.ds = config.training.distill
        self.p_uncond = config.training.p_uncond
        self.schedule = spec.make_schedule()
        self.teacher_prediction = config.diffusion.prediction_type  # the teacher's (filled from its spec)
        self.guidance = None if self.ds.guidance is None else float(self.ds.guidance)
        self.clip = 1.0 if spec.autoencoder is None else None

    def init(self, key) -> dict:
        return self.spec.init(key)

    def frozen_shapes(self) -> dict:
        shapes = {"teacher": self.spec.network_params(self.spec.param_shapes())}
        if self.spec.autoencoder is not None:
            shapes["autoencoder"] = self.spec.autoencoder.param_shapes()
        return shapes

    def model_params(self, params, frozen) -> dict:
        return params if self.spec.autoencoder is None else {"denoiser": params, "autoencoder": frozen["autoencoder"]}

    def _net(self, params, y, cond, *, train=False, dropout_key=None):
        """``out(x, t)`` of the network with ``params`` under the labels and concat channels."""
        def net(x, tt, yy):
            kw = {"train": True, "rngs": {"dropout": dropout_key}} if train else {}
            return self.model.apply({"params": params}, x, tt, yy, **kw)

        return lambda x, t: conditioning.apply(net, Conditioning(labels=y, concat=cond), x, t)

    def _teacher_x0(self, teacher, y, cond, prediction, guidance):
        """The teacher's x0-prediction ``x0_fn(x, t)``: guided at ``guidance`` (a traced scale, or None) for a
        class-conditional teacher, output read as ``prediction`` (a traced bool ``is_teacher`` selects between
        the given teacher's type and the student's in progressive rounds), clipped in pixel space."""
        cond_fn = self._net(teacher, y, cond)
        null_fn = None
        if guidance is not None and y is not None:
            null_fn = self._net(teacher, jnp.full_like(y, self.spec.null_label), cond)

        def x0_fn(x, t):
            t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (x.shape[0],))
            out = cond_fn(x, t)
            if null_fn is not None:
                un = null_fn(x, t)
                out = un + guidance * (out - un)
            x0 = prediction(out, x, self.schedule.alpha_bar(t))
            x0 = jax.lax.stop_gradient(x0)
            return x0 if self.clip is None else jnp.clip(x0, -self.clip, self.clip)

        return x0_fn

    def preview(self, params, mesh, source, n: int, config):
        """``n`` samples of the student at its own step count."""
        model = experiments.Model(self.spec, params, mesh)
        sources = None if self.spec.concat is None else source.get(range(min(n, len(source))))
        return experiments.generate(model, n, round_up(n, mesh.devices.size), int(self.spec.distilled["steps"]),
                                    seed=config.training.seed + 1, progress=False, sources=sources)


class Progressive(_Distill):
    """Progressive distillation (see the module's doc)."""

    def __init__(self, config, spec, model):
        super().__init__(config, spec, model)
        ds = self.ds
        self.counts = progressive_rounds(config)
        T = self.schedule.num_timesteps
        width = 2 * self.counts[0] + 1
        grids = [np.pad(dmath.progressive_grid(T, n), (0, width - 2 * n - 1), mode="edge") for n in self.counts]
        self.grids = np.stack(grids).astype(np.int32)  # [rounds, 2 N_0 + 1]
        self.round_steps = int(ds.round_steps)
        self.student_prediction = ds.prediction_type

    def summary(self) -> str:
        return (f"objective: progressive distillation ({' -> '.join(map(str, self.counts))} student steps, "
                f"{self.round_steps} training steps a round; {self.student_prediction} student, "
                f"{self.ds.weighting} weight; teacher {self.ds.teacher}"
                + (f" guided at {self.guidance:g}" if self.guidance is not None else "") + ")")

    def round_of(self, step: int) -> int:
        """The round that trains at step ``step`` (0-based; the last round's index past the end)."""
        return min(int(step) // self.round_steps, len(self.counts) - 1)

    def spec_at(self, step: int) -> ModelSpec:
        """The spec of the student at step ``step`` (after ``step`` updates): its round's step count."""
        r = self.round_of(max(int(step) - 1, 0))
        return dataclasses.replace(self.spec, distilled=dict(self.spec.distilled, steps=self.counts[r],
                                   timesteps=make_timesteps(self.schedule.num_timesteps, self.counts[r],
                                                            dmath.SAMPLE_SPACING).tolist()))

    def round_ends(self, step: int) -> bool:
        return step > 0 and step % self.round_steps == 0

    def teacher_at(self, step: int, workdir: str):
        """The teacher's params for the round that trains from step ``step`` on: None for round 0 (the run's
        frozen teacher), else the previous round's exported student."""
        r = self.round_of(step)
        if r == 0:
            return None
        path = round_dir(workdir, self.counts[r - 1])
        if not models.is_model_dir(path):
            raise FileNotFoundError(f"the progressive run in {workdir} is in round {r + 1} but round {r}'s student "
                                    f"{path} is missing")
        spec, params = models.load(path)
        return spec.network_params(params)

    def export_round(self, step: int, params, workdir: str) -> str:
        """Writes the student ending at ``step`` (its model params) to its round's model directory."""
        spec = self.spec_at(step)
        info = dict(spec.info, source=f"{os.path.abspath(workdir)} (step {step}, EMA params, round "
                    f"{self.round_of(step - 1) + 1} of {len(self.counts)})", step=step)
        os.makedirs(os.path.join(workdir, ROUNDS_DIR), exist_ok=True)
        return models.save(round_dir(workdir, spec.distilled["steps"]), dataclasses.replace(spec, info=info), params,
                           overwrite=True)

    def loss(self, params, frozen, x0, labels, keys, step, dropout_key):
        x0, y, cond = diffusion_inputs(self.spec, frozen, x0, labels, keys, self.p_uncond)
        r = jnp.minimum(step // self.round_steps, len(self.counts) - 1)
        n = jnp.asarray(self.counts, jnp.int32)[r]
        grid = jnp.asarray(self.grids)[r]
        i = jax.vmap(lambda k: jax.random.randint(k, (), 1, n + 1, jnp.int32))(fold(keys, 0))
        t, t_mid, t_end = grid[2 * i], grid[2 * i - 1], grid[2 * i - 2]
        ab = self.schedule.alpha_bar
        a_t, a_mid, a_end = ab(t), ab(t_mid), ab(t_end)
        noise = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], jnp.float32))(fold(keys, 1))
        z = _bcast(jnp.sqrt(a_t), x0) * x0 + _bcast(jnp.sqrt(1.0 - a_t), x0) * noise
        first = r == 0
        teacher_type, student_type = self.teacher_prediction, self.student_prediction

        def prediction(out, x, a):  # round 0: the given teacher's output type; later rounds: the student's
            given = predict_x0_eps(out, x, a, teacher_type)[0]
            return jnp.where(first, given, predict_x0_eps(out, x, a, student_type)[0])

        guidance = None if self.guidance is None else jnp.where(first, jnp.float32(self.guidance), 1.0)
        x0_fn = self._teacher_x0(frozen["teacher"], y, cond, prediction, guidance)
        target, _ = dmath.progressive_target(x0_fn, z, t, t_mid, t_end, a_t, a_mid, a_end)
        target = jax.lax.stop_gradient(target)
        out = self._net(params, y, cond, train=True, dropout_key=dropout_key)(z, t)
        x_hat = predict_x0_eps(out, z, a_t, student_type)[0]
        w = dmath.snr_weight(a_t, self.ds.weighting)
        per = w * jnp.mean(jnp.square(x_hat - target).reshape(x_hat.shape[0], -1), axis=1)
        return jnp.mean(per), {"round": r.astype(jnp.float32) + 1}


class Consistency(_Distill):
    """Consistency distillation (see the module's doc); its target network is the run's EMA."""

    needs_ema = True  # the train step passes the EMA params (ema=) to the loss

    def __init__(self, config, spec, model):
        super().__init__(config, spec, model)
        self.grid = dmath.consistency_grid(self.schedule.num_timesteps, int(self.ds.steps))
        self.network_prediction, self.t_min, sd, scaling = spec.consistency_settings()
        self.coefficients = dict(t_min=self.t_min, sigma_data=sd, scaling=scaling)

    def summary(self) -> str:
        return (f"objective: consistency distillation ({len(self.grid)} points, teacher {self.ds.solver} step, "
                f"{self.ds.metric} metric, target network the EMA (decay {self.config.training.ema_decay}); "
                f"teacher {self.ds.teacher}" + (f" guided at {self.guidance:g}" if self.guidance is not None else "")
                + ")")

    def consistency_fn(self, params, y, cond, **kw):
        """``f(x, t)`` of the network with ``params``."""
        net = self._net(params, y, cond, **kw)

        def f(x, t):
            x0 = predict_x0_eps(net(x, t), x, self.schedule.alpha_bar(t), self.network_prediction)[0]
            return dmath.consistency_output(x, x0, t, **self.coefficients)

        return f

    def loss(self, params, frozen, x0, labels, keys, step, dropout_key, ema=None):
        x0, y, cond = diffusion_inputs(self.spec, frozen, x0, labels, keys, self.p_uncond)
        grid, ab = jnp.asarray(self.grid), self.schedule.alpha_bar
        two = self.ds.solver == "dpmpp_2m"
        n = jax.vmap(lambda k: jax.random.randint(k, (), 0, len(self.grid) - (2 if two else 1), jnp.int32))(
            fold(keys, 0))
        noise = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], jnp.float32))(fold(keys, 1))
        prediction = lambda out, x, a: predict_x0_eps(out, x, a, self.teacher_prediction)[0]  # noqa: E731
        x0_fn = self._teacher_x0(frozen["teacher"], y, cond, prediction, self.guidance)
        t_n, t_up = grid[n], grid[n + 1]
        if two:
            t_far = grid[n + 2]
            a_far = ab(t_far)
            x_far = _bcast(jnp.sqrt(a_far), x0) * x0 + _bcast(jnp.sqrt(1.0 - a_far), x0) * noise
            x_up, x_hat = dmath.teacher_step_2m(x0_fn, x_far, t_far, t_up, t_n, a_far, ab(t_up), ab(t_n))
        else:
            a_up = ab(t_up)
            x_up = _bcast(jnp.sqrt(a_up), x0) * x0 + _bcast(jnp.sqrt(1.0 - a_up), x0) * noise
            x_hat = dmath.ddim_to(x_up, x0_fn(x_up, t_up), a_up, ab(t_n))
        x_up, x_hat = jax.lax.stop_gradient(x_up), jax.lax.stop_gradient(x_hat)
        target = jax.lax.stop_gradient(self.consistency_fn(ema, y, cond)(x_hat, t_n))
        online = self.consistency_fn(params, y, cond, train=True, dropout_key=dropout_key)(x_up, t_up)
        return jnp.mean(dmath.metric(online, target, self.ds.metric)), {}


OBJECTIVES = {"progressive": Progressive, "consistency": Consistency}


def make(config, spec: ModelSpec, model):
    return OBJECTIVES[config.training.distill.method](config, spec, model)

