"""Fine-tuning: a run that starts from a trained model (``training.init_from``) instead of random weights.

``training.init_from`` names a model directory (a converted DDPM, a previous run's export) or a training
workdir (its exported EMA model, ``workdir/model``, as ``latent.autoencoder`` reads one). The model's spec
fixes the run's architecture: :func:`fill_config` fills each field of the config's model block (and
``data.image_size`` / ``data.channels``, the ``diffusion`` block, ``latent.scale_factor``) that is left at its
default from the spec, and refuses a field set to another value than the spec's, naming it. A latent model's
autoencoder and scale factor are the run's frozen ones (``latent.autoencoder`` stays ''); the run record holds
them with their digest, and the init model's path, spec and params digest (:class:`~ddim_jax.training.run.Record`).

A resumed run (one with checkpoints whose record names the same ``init_from``) does not read ``init_from``
again: its spec is the record's, its autoencoder the run's copy (``workdir/autoencoder``), and a LoRA run's
frozen base the run's copy ``workdir/lora_base`` (:mod:`ddim_jax.training.adapters`); without the copy, the
path is read and its digest must be the record's. Non-finite init params are refused.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import jax
import ml_collections
import numpy as np

from ddim_jax import kinds, models
from ddim_jax.config import base_config, distilling, to_dict
from ddim_jax.training import adapters, latent

RECORD_FILE = "run.json"  # (ddim_jax.training.run's)


@dataclasses.dataclass
class InitModel:
    """The model a run starts from: its path, spec, params digest, and the params (None on a full resume)."""

    path: str
    spec: models.ModelSpec
    sha256: str
    params: dict | None

    def network_params(self):
        return None if self.params is None else self.spec.network_params(self.params)


def read(path) -> InitModel:
    """The model ``training.init_from`` names; one-line errors for what is not a finite diffusion model."""
    if not isinstance(path, str) or not os.path.exists(path):
        raise FileNotFoundError(f"training.init_from: {path!r} does not exist (it names the model to start from: a "
                                "model directory or a training workdir)")
    export, where = os.path.join(path, models.EXPORT_DIR), path
    if not models.is_model_dir(path) and os.path.isdir(os.path.join(path, "checkpoints")):
        if not models.is_model_dir(export):
            raise FileNotFoundError(f"training.init_from: the training workdir {path!r} has no exported model "
                                    f"({export}); let its run reach a checkpoint, or name a model directory")
        where = export
    try:
        spec, params = models.load(where)
    except (ValueError, OSError) as e:
        raise ValueError(f"training.init_from: {path!r} holds no model to start from "
                         f"({(str(e).splitlines() or [''])[0][:200]})") from None
    check(spec, path)
    flat = models._flatten(jax.tree.map(np.asarray, params))
    bad = [k for k, v in sorted(flat.items()) if not np.all(np.isfinite(v))]
    if bad:
        raise ValueError(f"training.init_from: {path!r} has non-finite parameters ({len(bad)} arrays, e.g. {bad[0]})")
    return InitModel(os.path.abspath(path), spec, models.params_digest(params), params)


def check(spec: models.ModelSpec, path: str) -> None:
    if not spec.is_diffusion:
        raise ValueError(f"training.init_from: {path!r} holds a {spec.kind}, not a diffusion model")
    if spec.kind not in kinds.trainable():
        raise ValueError(f"training.init_from: {path!r} holds a {spec.kind}, which train.py cannot train "
                         f"(no text data); trainable kinds: {', '.join(kinds.trainable())}")
    if spec.text_encoder is not None:
        raise ValueError(f"training.init_from: {path!r} holds a model with a text encoder, which train.py cannot train")


def _disagree(field: str, given, want, path: str):
    return ValueError(f"{field} is {given!r} but the init model ({path}) has {want!r}: leave it at its default "
                      "or set that")


def fill_config(config, spec: models.ModelSpec, path: str) -> ml_collections.ConfigDict:
    """A copy of ``config`` with its model fields filled from ``spec`` (see the module's doc)."""
    c = copy.deepcopy(config) if isinstance(config, ml_collections.ConfigDict) else ml_collections.ConfigDict(config)
    default = base_config()
    if c.model.kind != spec.kind:
        if c.model.kind != default.model.kind or to_dict(c.model) != to_dict(default.model):
            raise _disagree("model.kind", c.model.kind, spec.kind, path)
        c.model = base_config(spec.kind).model
        default = base_config(spec.kind)
    entry = kinds.get(spec.kind)
    values = dict(entry.full_arch(spec.arch), num_classes=spec.num_classes)
    for name in list(to_dict(c.model)):
        if name == "kind":
            continue
        fill(c, default, "model", name, _plain(values.get(name)), path)
    images = spec.autoencoder or spec
    fill(c, default, "data", "image_size", images.image_size, path)
    fill(c, default, "data", "channels", images.channels, path)
    schedule = dict(spec.schedule)
    extra = sorted(set(schedule) - {"name", "num_timesteps", "beta_start", "beta_end"})
    if extra:
        raise ValueError(f"diffusion.schedule: the init model's schedule ({path}) has {extra[0]}, which a training "
                         "config cannot hold")
    for name in ("schedule", "num_timesteps", "beta_start", "beta_end"):
        key = "name" if name == "schedule" else name
        if key in schedule:
            fill(c, default, "diffusion", name, schedule[key], path)
    fill(c, default, "diffusion", "prediction_type", spec.prediction_type, path)
    fill(c, default, "diffusion", "concat", spec.concat or "", path)
    if c.latent.autoencoder:
        raise ValueError(f"latent.autoencoder must be '' with training.init_from: the init model ({path}) fixes the "
                         + ("autoencoder" if spec.autoencoder is not None else "space (pixels)"))
    if spec.autoencoder is not None:
        fill(c, default, "latent", "scale_factor", float(spec.scale_factor), path)
    if spec.num_classes is not None and (spec.null_label is None) != (c.training.p_uncond == 0):
        raise ValueError(f"training.p_uncond must be {'0' if spec.null_label is None else '> 0'}: the init model "
                         f"({path}) has {'no' if spec.null_label is None else 'a'} null label")
    return c


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def fill(c, default, block: str, name: str, want, path: str) -> None:
    given, dflt = to_dict(c[block]).get(name), to_dict(default[block]).get(name)
    if given == want:
        return
    if given != dflt:
        raise _disagree(f"{block}.{name}", given, want, path)
    c[block][name] = tuple(want) if isinstance(want, list) else want


def _recorded(workdir: str | None, path: str) -> dict | None:
    """The record of the run in ``workdir`` when it has checkpoints and started from ``path``."""
    if not workdir:
        return None
    ck = os.path.join(workdir, "checkpoints")
    if not (os.path.isdir(ck) and any(n.isdigit() for n in os.listdir(ck))):
        return None
    try:
        with open(os.path.join(workdir, RECORD_FILE)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if isinstance(record, dict) and record.get("init_from") == os.path.abspath(path) and record.get("init_spec"):
        return record
    return None


@dataclasses.dataclass
class Start:
    """What :func:`resolve` found: the filled config, the init model, the frozen autoencoder (a latent init's)
    and a LoRA run's frozen base network params."""

    config: ml_collections.ConfigDict
    init: InitModel
    first_stage: latent.FirstStage | None
    base: dict | None


def resolve(config, workdir: str | None) -> Start | None:
    """The run's start (None without ``training.init_from``). Writes nothing."""
    path = config.training.get("init_from") or (config.training.distill.teacher if distilling(config) else "")
    if not path:  # (a distillation run starts from its teacher: ddim_jax.training.distill)
        return None
    record = _recorded(workdir, path)
    if record is not None:  # a resume: the record's spec; the run's copies, else the path (digest-checked)
        spec = models.ModelSpec.from_dict(record["init_spec"])
        init = InitModel(os.path.abspath(path), spec, record["init_sha256"], None)
    else:
        init = read(path)
        spec = init.spec
    c = fill_config(config, spec, path)
    first, base = None, None
    copy = os.path.join(workdir, latent.COPY_DIR) if workdir else None
    if spec.autoencoder is not None:
        if record is not None and copy and models.is_model_dir(copy):
            ae_spec, ae_params = models.load(copy)
            first = latent.FirstStage(ae_spec, ae_params, copy, True, float(spec.scale_factor))
        else:
            init = _params(init, path)
            first = latent.FirstStage(dataclasses.replace(spec.autoencoder, info={}), init.params["autoencoder"],
                                      f"{init.path} (the init model's autoencoder)", False, float(spec.scale_factor))
    if adapters.enabled(c):
        base_copy = os.path.join(workdir, adapters.BASE_DIR) if workdir else None
        if record is not None and base_copy and models.is_model_dir(base_copy):
            base_spec, base_params = models.load(base_copy)
            if models.params_digest(base_params) != init.sha256:
                raise ValueError(f"training.init_from: the run's copy {base_copy} is not the model the run started "
                                 "from (its digest differs from the run record's)")
            init = dataclasses.replace(init, params=base_params)
        init = _params(init, path)
        base = init.network_params()
    return Start(c, init, first, base)


def _params(init: InitModel, path: str) -> InitModel:
    """``init`` with its params (read from ``path`` on a resume, and required to be the recorded ones)."""
    if init.params is not None:
        return init
    again = read(path)
    if again.sha256 != init.sha256:
        raise ValueError(f"training.init_from: {path!r} no longer holds the model this run started from (its params "
                         "digest differs from the run record's)")
    return again


def save_base_copy(workdir: str, start: Start) -> None:
    """A LoRA run's copy of its init model (written once), which its resume and its checkpoints' export read."""
    path = os.path.join(workdir, adapters.BASE_DIR)
    if start.base is None or models.is_model_dir(path):
        return
    models.save(path, dataclasses.replace(start.init.spec, info={"source": start.init.path}), start.init.params)


def load_base_copy(workdir: str) -> dict:
    """A LoRA run's frozen base network params, from its copy."""
    path = os.path.join(workdir, adapters.BASE_DIR)
    if not models.is_model_dir(path):
        raise FileNotFoundError(f"{workdir} trained LoRA adapters but its base model copy {path} is missing")
    spec, params = models.load(path)
    return spec.network_params(params)
