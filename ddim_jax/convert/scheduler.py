"""diffusers scheduler configs -> our schedules and prediction types (the diffusers and Stable Diffusion formats)."""

from __future__ import annotations

import os
from typing import Any, Mapping

from ddim_jax.convert.common import BOOL, DIFFUSERS_VERSION, NUMBER, OPTIONAL_NUMBERS, TIMESTEPS, config_value
from ddim_jax.models import ModelSpec
from ddim_jax.schedules import make_schedule
from ddim_jax.state_dicts import ConversionError

# DDPM's noise schedule (a ModelSpec schedule), used by every checkpoint of the paper.
DDPM_SCHEDULE = {"name": "linear", "num_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02}

# diffusers' beta_schedule names -> ours (ddim_jax.schedules.SCHEDULES; make_schedule gives the same betas),
# and diffusers' prediction types -> ours (ddim_jax.diffusion.PREDICTION_TYPES).
DIFFUSERS_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine",
                       "sigmoid": "sigmoid"}
DIFFUSERS_PREDICTION_TYPES = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}
# DDPMScheduler.__init__ defaults for the settings we read.
_DIFFUSERS_SCHEDULER_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                     beta_schedule="linear", trained_betas=None, prediction_type="epsilon",
                                     rescale_betas_zero_snr=False)


def find_scheduler_config(config_dir: str) -> str | None:
    """The diffusers scheduler_config.json beside the model or in its pipeline's scheduler/, if any."""
    for cand in (os.path.join(config_dir, "scheduler_config.json"),
                 os.path.join(config_dir, os.pardir, "scheduler", "scheduler_config.json")):
        if os.path.isfile(cand):
            return os.path.normpath(cand)
    return None


def diffusers_schedule(scheduler_config: Mapping[str, Any] | None,
                       where: str = "diffusers scheduler config") -> tuple[dict, str]:
    """Our schedule (a :class:`ModelSpec` schedule) and prediction type for a diffusers scheduler config.

    ``None`` (no scheduler config) gives DDPM's schedule and epsilon prediction. ``beta_schedule`` names are
    translated (:data:`DIFFUSERS_SCHEDULES`), ``trained_betas`` become a ``custom`` schedule,
    ``rescale_betas_zero_snr`` is ``rescale_zero_terminal_snr`` and ``prediction_type`` is translated by
    :data:`DIFFUSERS_PREDICTION_TYPES`; anything else is a :class:`ConversionError` naming ``where``.
    """
    if scheduler_config is None:
        return dict(DDPM_SCHEDULE), "epsilon"
    d = _DIFFUSERS_SCHEDULER_DEFAULTS
    c = {**d, **scheduler_config}
    for key, allowed in (("num_train_timesteps", TIMESTEPS), ("trained_betas", OPTIONAL_NUMBERS),
                         ("beta_start", NUMBER), ("beta_end", NUMBER), ("rescale_betas_zero_snr", BOOL)):
        config_value(scheduler_config, key, d[key], allowed, where)
    pred = c["prediction_type"]
    if pred not in DIFFUSERS_PREDICTION_TYPES:
        raise ConversionError(f"{where}: prediction_type={pred!r} is not supported; allowed: "
                              f"{', '.join(DIFFUSERS_PREDICTION_TYPES)}")
    T = c["num_train_timesteps"]
    if c["trained_betas"] is not None:
        betas = [float(b) for b in c["trained_betas"]]
        if "num_train_timesteps" in scheduler_config and T != len(betas):
            raise ConversionError(f"{where}: trained_betas has {len(betas)} values but num_train_timesteps={T!r}")
        schedule = {"name": "custom", "betas": betas}
    else:
        name = c["beta_schedule"]
        if name not in DIFFUSERS_SCHEDULES:
            raise ConversionError(f"{where}: beta_schedule={name!r} is not supported; allowed: "
                                  f"{', '.join(DIFFUSERS_SCHEDULES)} (or trained_betas)")
        schedule = {"name": DIFFUSERS_SCHEDULES[name], "num_timesteps": T}
        if name != "squaredcos_cap_v2":  # diffusers' cosine schedule ignores beta_start and beta_end
            schedule.update(beta_start=float(c["beta_start"]), beta_end=float(c["beta_end"]))
    if c["rescale_betas_zero_snr"]:
        schedule["rescale_zero_terminal_snr"] = True
    try:  # values make_schedule refuses (beta_end > 1, ...) fail here, naming the config
        args = dict(schedule)
        make_schedule(args.pop("name"), **args)
    except ValueError as e:
        raise ConversionError(f"{where}: {e}") from None
    return schedule, DIFFUSERS_PREDICTION_TYPES[pred]


# Our schedules diffusers' DDIMScheduler computes by name (the others are written as trained_betas).
_DDIM_NAMES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
SCHEDULER_CLASS = "DDIMScheduler"


def scheduler_config(spec: ModelSpec) -> dict:
    """A diffusers ``DDIMScheduler`` config (``scheduler_config.json``) for a diffusion model's schedule and
    prediction type: the inverse of :func:`diffusers_schedule`. ``linear``, ``scaled_linear`` and ``cosine``
    (``squaredcos_cap_v2``) by name, every other schedule (``custom``, ``quadratic``, ``sigmoid``) as its
    ``trained_betas``; ``rescale_zero_terminal_snr`` is ``rescale_betas_zero_snr``. Sampling settings as
    ddim_jax's DDIM sampler: no clipping, the last step lands on alpha-bar 1 (``set_alpha_to_one``), and
    ``"leading"`` timesteps without an offset (ddim_jax's ``"uniform"`` spacing where S divides T)."""
    schedule = dict(spec.schedule)
    name = schedule.pop("name")
    rescale = bool(schedule.pop("rescale_zero_terminal_snr", False))
    config = {"_class_name": SCHEDULER_CLASS, "_diffusers_version": DIFFUSERS_VERSION,
              "prediction_type": {v: k for k, v in DIFFUSERS_PREDICTION_TYPES.items()}[spec.prediction_type],
              "clip_sample": False, "set_alpha_to_one": True, "steps_offset": 0, "timestep_spacing": "leading",
              "rescale_betas_zero_snr": rescale, "trained_betas": None}
    if name in _DDIM_NAMES:
        config.update(beta_schedule=_DDIM_NAMES[name], num_train_timesteps=schedule["num_timesteps"])
        if name != "cosine":  # the ends as make_schedule used them (its defaults where the spec has none)
            betas = make_schedule(name, **schedule).betas
            lo, hi = (schedule.get("beta_start"), schedule.get("beta_end"))
            config.update(beta_start=float(betas[0] if lo is None else lo),
                          beta_end=float(betas[-1] if hi is None else hi))
        return config
    betas = [float(b) for b in (schedule["betas"] if name == "custom" else make_schedule(name, **schedule).betas)]
    config.update(beta_schedule="linear", num_train_timesteps=len(betas), trained_betas=betas)
    return config
