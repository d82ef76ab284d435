"""A training config resolved once, into the parts the stages of a run take.

:func:`resolve` reads what the config names outside itself (a latent model's autoencoder, an
autoencoder's LPIPS weights), validates the config, and builds the model spec and the objective once;
the train state, the train step, the memory plan, the checkpoints and the loop take the :class:`Run`
(``run.config`` for their own block, ``run.spec``, ``run.objective``, ``run.frozen``) instead of the
config, so the spec and the objective are built once and every stage uses the same ones.

What a run finds when it starts is its :class:`Record`, kept beside its config (``workdir/run.json``
and each checkpoint's metadata): the frozen autoencoder's spec and parameter digest, the latents'
scale factor and the LPIPS files' digest. The config stays what the user asked for, with defaults; a
resumed run whose record differs (other LPIPS weights under the same paths, another autoencoder after
its copy was deleted) is refused, naming the field.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import ml_collections

from ddim_jax import models
from ddim_jax.config import flatten, spec_from_config, to_dict, validate_config, with_defaults
from ddim_jax.training import distill, finetune, latent, perceptual
from ddim_jax.training.objectives import make_objective

RECORD_FILE = "run.json"


@dataclasses.dataclass(frozen=True)
class Record:
    """What a run found when it started (see the module docstring); empty fields do not apply."""

    autoencoder: Mapping[str, Any] | None = None  # the frozen autoencoder's spec (its to_dict(), no info)
    autoencoder_sha256: str = ""
    scale_factor: float = 0.0  # the latents' scale factor (given or estimated); 0 = not known yet
    lpips_sha256: str = ""
    init_from: str = ""  # training.init_from's model: its absolute path, spec (to_dict(), no info) and params digest
    init_spec: Mapping[str, Any] | None = None
    init_sha256: str = ""

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Record":
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, Mapping) or set(d) - names:
            raise ValueError(f"a run record has the fields {', '.join(sorted(names))}; got {d!r:.200}")
        return cls(**d)

    @classmethod
    def of_saved(cls, meta: Mapping[str, Any]) -> "Record":
        """The record a checkpoint's metadata holds; from a run saved before records existed, the fields
        its config held (:data:`ddim_jax.config.RECORDED_ELSEWHERE`, and a latent run's estimated
        ``latent.scale_factor``)."""
        if "record" in meta:
            return cls.from_dict(meta["record"])
        old = flatten(to_dict(meta["config"]))
        spec = old.get("latent.autoencoder_spec") or ""
        return cls(autoencoder=json.loads(spec) if spec else None,
                   scale_factor=float(old.get("latent.scale_factor") or 0.0) if spec else 0.0,
                   lpips_sha256=old.get("loss.lpips_sha256") or "")

    def differences(self, saved: "Record") -> list[str]:
        """The fields in which this record differs from ``saved`` (a run's own), as ``record.<field>``; an
        autoencoder digest ``saved`` lacks (written before digests were recorded) is not compared."""
        return [f"record.{f.name}" for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(saved, f.name)
                and not (f.name == "autoencoder_sha256" and not saved.autoencoder_sha256)]


@dataclasses.dataclass(frozen=True)
class Run:
    """A validated config and what follows from it. ``frozen``: the parameters the step uses but does not
    train (``{"autoencoder": ...}``, ``{"lpips": ...}`` or ``{}``); ``first_stage``: a latent run's
    autoencoder as read (:class:`ddim_jax.training.latent.FirstStage`)."""

    config: ml_collections.ConfigDict
    record: Record
    spec: models.ModelSpec
    objective: Any
    frozen: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    first_stage: latent.FirstStage | None = None
    start: finetune.Start | None = None  # training.init_from's model (ddim_jax.training.finetune)

    def with_scale(self, scale: float) -> "Run":
        """This run with the latents' scale factor (estimated once the data is open)."""
        return build(self.config, dataclasses.replace(self.record, scale_factor=float(scale)), self.frozen,
                     self.first_stage, self.start)

    @property
    def init_params(self):
        """The trainable params a fine-tuning run starts from (None: the objective's random init, or the
        adapters' of a LoRA run)."""
        if self.start is None or self.start.base is not None or self.start.init.params is None:
            return None
        return self.start.init.network_params()


def resolve(config, workdir: str | None = None, *, num_devices: int = 1, num_processes: int = 1) -> Run:
    """Reads what ``config`` names (from the run's own copies in ``workdir`` where it has them), validates
    it for ``num_devices`` over ``num_processes``, and builds its spec and objective. Writes nothing."""
    start = finetune.resolve(config, workdir)
    if start is not None:
        config = start.config  # its model fields filled from the init model (ddim_jax.training.finetune)
    validate_config(config, num_devices, num_processes)
    first = latent.resolve(config, workdir) if start is None else start.first_stage
    frozen, lpips_sha256 = perceptual.resolve(config)
    record = Record(lpips_sha256=lpips_sha256)
    if start is not None:
        record = dataclasses.replace(record, init_from=start.init.path, init_sha256=start.init.sha256,
                                     init_spec={k: v for k, v in start.init.spec.to_dict().items() if k != "info"})
        if start.base is not None:
            frozen = dict(frozen, base=start.base)
        if distill.enabled(config):  # the frozen teacher, whose copy the student starts as
            distill.check_teacher(config, start.init.spec, start.init.path)
            start = dataclasses.replace(start, init=finetune._params(start.init, start.init.path))
            frozen = dict(frozen, teacher=start.init.network_params())
    if first is not None:
        frozen = dict(frozen, autoencoder=first.params)
        record = dataclasses.replace(
            record, autoencoder={k: v for k, v in first.spec.to_dict().items() if k != "info"},
            autoencoder_sha256=first.sha256, scale_factor=float(config.latent.scale_factor or first.scale_factor or 0))
    return build(config, record, frozen, first, start)


def build(config, record: Record | None = None, frozen=None, first_stage=None, start=None) -> Run:
    """The :class:`Run` of an already validated config and its record (a checkpoint's, to read it back)."""
    record = record or Record()
    ae = None if record.autoencoder is None else models.ModelSpec.from_dict(record.autoencoder)
    spec = spec_from_config(config, autoencoder=ae, scale_factor=record.scale_factor or None)
    if distill.enabled(config):
        spec = distill.student_spec(config, spec, record.init_from)
    objective = make_objective(config, spec)
    return Run(config, record, spec, objective, dict(frozen or {}), first_stage, start)


def from_saved(meta: Mapping[str, Any]) -> Run:
    """The run a checkpoint's metadata describes (its config, with defaults, and its record); no frozen
    parameters are read."""
    return build(ml_collections.ConfigDict(with_defaults(meta["config"])), Record.of_saved(meta))


__all__ = ["RECORD_FILE", "Record", "Run", "build", "from_saved", "resolve"]
