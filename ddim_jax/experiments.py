"""The paper's experiments on a trained model: sampling, consistency, interpolation, the x0
sequence, reconstruction (Table 2) and FID (Table 1). ``sample.py`` is the command line over these.

Every batch is sharded over all devices of all hosts; x_T of sample ``i`` is drawn from
``fold_in(key(seed), i)``, so a seed gives the same images whatever the device count and batch size
(with eta > 0 the per-step noise is drawn per batch, so it depends on the batch size, not on the
device count).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddim_jax.images import from_uint8, save_grid, to_uint8
from ddim_jax.sampling import ddim_encode, ddim_sample, slerp
from ddim_jax.schedules import Schedule, make_schedule
from ddim_jax.unet import UNet, make_eps_fn

MODES = ("sample", "consistency", "interpolation", "sequence", "reconstruction", "fid")

# diffusers' beta_schedule names -> ours.
_DIFFUSERS_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine",
                        "sigmoid": "sigmoid"}


@dataclasses.dataclass
class Model:
    """A trained network ready to sample: the UNet, its (EMA) params replicated over ``mesh``, the
    schedule it was trained with, and where it came from."""

    unet: UNet
    params: Any
    schedule: Schedule
    image_size: int
    channels: int
    prediction_type: str
    data: dict  # the training run's data config ({} for converted checkpoints)
    source: str
    mesh: jax.sharding.Mesh

    @property
    def eps_fn(self):
        return make_eps_fn(self.unet, self.params)


def schedule_from_dict(d: dict) -> Schedule:
    """A schedule from a training config's ``diffusion`` block or a converted checkpoint's."""
    if d.get("trained_betas") is not None:
        return make_schedule("custom", betas=d["trained_betas"])
    name = _DIFFUSERS_SCHEDULES.get(d.get("schedule", "linear"), d.get("schedule"))
    kw = {} if name == "cosine" else {k: d[k] for k in ("beta_start", "beta_end") if d.get(k) is not None}
    return make_schedule(name, int(d.get("num_timesteps", 1000)), **kw)


def load_model(workdir: str | None = None, checkpoint: str | None = None, *, step: int | None = None,
               use_ema: bool = True) -> Model:
    """From a training run (``workdir``; its EMA params unless ``use_ema=False``) or a checkpoint
    written by ``python -m ddim_jax.convert`` (``checkpoint``)."""
    from ddim_jax import training

    if (workdir is None) == (checkpoint is None):
        raise ValueError("give exactly one of workdir (a training run) or checkpoint (a converted checkpoint)")
    mesh = training.make_mesh()
    replicated = NamedSharding(mesh, P())
    if workdir is not None:
        if not os.path.isdir(workdir):
            raise FileNotFoundError(f"workdir {workdir!r} does not exist")
        try:
            config, state, meta = training.load_checkpoint(workdir, step)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"the checkpoint in {workdir!r} does not match the architecture in its config.json: "
                             f"{str(e).splitlines()[0][:300]}") from None
        params = state.ema_params if use_ema else state.params
        return Model(training.make_model(config), params, training.make_diffusion_schedule(config),
                     config.data.image_size, config.data.channels, config.diffusion.prediction_type,
                     config.data.to_dict(), f"{workdir} (step {meta['step']}, {'EMA' if use_ema else 'raw'} params)",
                     mesh)
    from ddim_jax.checkpoint_io import load_converted

    if not os.path.exists(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist")
    config, params = load_converted(checkpoint)
    unet = UNet(**config["model"])
    from ddim_jax.unet import param_shapes

    expected = jax.tree.map(lambda s: s.shape, param_shapes(unet, config["image_size"], config["channels"]))
    got = jax.tree.map(lambda a: a.shape, params)
    if expected != got:
        raise ValueError(f"checkpoint {checkpoint!r}: its params do not match the UNet in its config.json")
    diffusion = config.get("diffusion", {})
    return Model(unet, jax.device_put(params, replicated), schedule_from_dict(diffusion), config["image_size"],
                 config["channels"], diffusion.get("prediction_type", "epsilon"), {}, checkpoint, mesh)


# ---------------------------------------------------------------------------------------------
# Sharded building blocks.


def _check_batch(model: Model, batch_size: int):
    n = model.mesh.devices.size
    if batch_size < 1 or batch_size % n:
        raise ValueError(f"batch_size must be a positive multiple of the number of devices ({n}); got {batch_size}")


def latents(model: Model, start: int, count: int, seed: int):
    """x_T of samples ``start .. start + count - 1``, ``[count, H, W, C]``, sharded over the batch."""
    shape = (model.image_size, model.image_size, model.channels)
    key = jax.random.key(seed)

    @jax.jit
    def draw(idx):
        return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape))(idx)

    idx = jax.device_put(np.arange(start, start + count, dtype=np.int32), NamedSharding(model.mesh, P("data")))
    return draw(idx)


def _gather(x) -> np.ndarray:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def decode(model: Model, x_T, num_steps: int, *, eta: float = 0.0, sigma_hat: bool = False,
           spacing: str = "uniform", key=None, clip_x0: float | None = 1.0, return_trajectory: bool = False):
    """DDIM decoding of sharded latents with the model (clipping x0 to [-1, 1] by default, like the
    paper's code)."""
    return ddim_sample(model.eps_fn, model.schedule, x_T, num_steps, eta=eta, sigma_hat=sigma_hat, spacing=spacing,
                       key=key, clip_x0=clip_x0, prediction_type=model.prediction_type,
                       return_trajectory=return_trajectory)


def generate(model: Model, num: int, batch_size: int, num_steps: int, *, eta: float = 0.0, sigma_hat: bool = False,
             spacing: str = "uniform", seed: int = 0, clip_x0: float | None = 1.0, progress: bool = True,
             desc: str = "sampling") -> np.ndarray:
    """Exactly ``num`` uint8 samples, ``[num, H, W, C]``, in batches of ``batch_size`` (the last
    batch padded and trimmed, so every batch has one shape and one compilation)."""
    from tqdm.auto import tqdm

    if num < 1:
        raise ValueError(f"the number of samples must be >= 1; got {num}")
    _check_batch(model, batch_size)
    out = np.empty((num, model.image_size, model.image_size, model.channels), np.uint8)
    noise_key = jax.random.fold_in(jax.random.key(seed), 1 << 30)
    bar = tqdm(total=num, desc=desc, unit="img", disable=not progress or jax.process_index() != 0)
    for b, start in enumerate(range(0, num, batch_size)):
        stochastic = sigma_hat or eta > 0
        x = decode(model, latents(model, start, batch_size, seed), num_steps, eta=eta, sigma_hat=sigma_hat,
                   spacing=spacing, key=jax.random.fold_in(noise_key, b) if stochastic else None, clip_x0=clip_x0)
        k = min(batch_size, num - start)
        out[start:start + k] = to_uint8(_gather(x)[:k])
        bar.update(k)
    bar.close()
    return out


# ---------------------------------------------------------------------------------------------
# Experiments.


def consistency(model: Model, num: int, steps: Sequence[int], *, seed: int = 0, spacing: str = "uniform"):
    """The same ``num`` latents decoded with each S in ``steps`` (Figure 4): uint8 ``[len(steps), num, ...]``."""
    n = _round_up(num, model.mesh.devices.size)
    x_T = latents(model, 0, n, seed)
    return np.stack([to_uint8(_gather(decode(model, x_T, s, spacing=spacing))[:num]) for s in steps])


def interpolation(model: Model, pairs: int, num_points: int, num_steps: int, *, seed: int = 0,
                  spacing: str = "uniform"):
    """Slerp between latent pairs (Figure 5), decoded with DDIM: uint8 ``[pairs, num_points, ...]``."""
    z = _gather(latents(model, 0, 2 * pairs, seed))
    alphas = np.linspace(0.0, 1.0, num_points)
    path = np.concatenate([np.asarray(slerp(z[2 * i], z[2 * i + 1], alphas)) for i in range(pairs)])
    n = _round_up(len(path), model.mesh.devices.size)
    path = np.concatenate([path, np.zeros((n - len(path),) + path.shape[1:], path.dtype)])
    x = jax.device_put(path, NamedSharding(model.mesh, P("data")))
    out = to_uint8(_gather(decode(model, x, num_steps, spacing=spacing))[:pairs * num_points])
    return out.reshape((pairs, num_points) + out.shape[1:])


def sequence(model: Model, num: int, num_steps: int, columns: int = 10, *, seed: int = 0, spacing: str = "uniform"):
    """The predicted x0 along the trajectory: uint8 ``[num, columns + 1, ...]`` (columns evenly spaced steps
    and the final sample)."""
    n = _round_up(num, model.mesh.devices.size)
    x0, _, x0_preds = decode(model, latents(model, 0, n, seed), num_steps, spacing=spacing, return_trajectory=True)
    cols = np.unique(np.linspace(0, num_steps - 1, min(columns, num_steps)).round().astype(int))
    preds = _gather(jnp.moveaxis(x0_preds[cols], 0, 1))[:num]
    return to_uint8(np.concatenate([preds, _gather(x0)[:num, None]], axis=1))


def reconstruction(model: Model, images: np.ndarray, steps: Sequence[int], batch_size: int, *,
                   spacing: str = "uniform", progress: bool = True):
    """Encode uint8 ``images`` to x_T and decode, for each S: ``({S: per-dimension MSE on [0, 1]},
    {S: reconstructions uint8})`` (the protocol of the paper's Table 2)."""
    from tqdm.auto import tqdm

    _check_batch(model, batch_size)
    x = from_uint8(images)
    errors, recons = {}, {}
    sharding = NamedSharding(model.mesh, P("data"))
    for s in steps:
        sq, out = 0.0, []
        for start in tqdm(range(0, len(x), batch_size), desc=f"reconstruct S={s}", disable=not progress):
            chunk = x[start:start + batch_size]
            k = len(chunk)
            chunk = np.concatenate([chunk, np.zeros((batch_size - k,) + chunk.shape[1:], chunk.dtype)])
            x0 = jax.device_put(chunk, sharding)
            x_T = ddim_encode(model.eps_fn, model.schedule, x0, s, spacing=spacing,
                              prediction_type=model.prediction_type)
            rec = _gather(decode(model, x_T, s, spacing=spacing, clip_x0=None))[:k]
            sq += float(np.sum(((np.clip(rec, -1, 1) + 1) / 2 - (chunk[:k] + 1) / 2) ** 2))
            out.append(to_uint8(rec))
        errors[s] = sq / x.size
        recons[s] = np.concatenate(out)
    return errors, recons


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# ---------------------------------------------------------------------------------------------
# FID.


def parse_eta(value: str) -> tuple[float, bool]:
    """'0.5' -> (0.5, False); 'sigma_hat' -> (0.0, True)."""
    if value in ("sigma_hat", "hat"):
        return 0.0, True
    try:
        eta = float(value)
    except ValueError:
        raise ValueError(f"eta must be a number >= 0 or 'sigma_hat'; got {value!r}") from None
    if eta < 0:
        raise ValueError(f"eta must be a number >= 0 or 'sigma_hat'; got {value!r}")
    return eta, False


def fid_table(model: Model, extractor, reference: tuple[np.ndarray, np.ndarray], num: int, batch_size: int,
              steps: Sequence[int], etas: Sequence[str], *, spacing: str, seed: int = 0,
              progress: bool = True) -> list[dict]:
    """FID of ``num`` samples for each (eta, S), against reference statistics (mu, sigma)."""
    from ddim_jax import fid as fid_lib

    rows = []
    for eta_s in etas:
        eta, hat = parse_eta(eta_s)
        for s in steps:
            imgs = generate(model, num, batch_size, s, eta=eta, sigma_hat=hat, spacing=spacing, seed=seed,
                            progress=progress, desc=f"eta={eta_s} S={s}")
            feats = extractor.extract(imgs, batch_size=max(batch_size, 50), progress=False)
            mu, sigma = fid_lib.compute_stats(feats)
            rows.append({"eta": eta_s, "steps": s, "num_samples": num,
                         "fid": fid_lib.fid_from_stats(mu, sigma, *reference)})
    return rows


def format_fid_table(rows: list[dict]) -> str:
    steps = sorted({r["steps"] for r in rows})
    etas = list(dict.fromkeys(r["eta"] for r in rows))
    val = {(r["eta"], r["steps"]): r["fid"] for r in rows}
    lines = ["| eta \\ S | " + " | ".join(map(str, steps)) + " |", "|---" * (len(steps) + 1) + "|"]
    for e in etas:
        lines.append(f"| {e} | " + " | ".join(f"{val[e, s]:.2f}" for s in steps) + " |")
    return "\n".join(lines)


def plot_fid(rows: list[dict], path: str):
    """FID against S, one line per eta (Figure 3, left), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for e in dict.fromkeys(r["eta"] for r in rows):
        pts = sorted((r["steps"], r["fid"]) for r in rows if r["eta"] == e)
        ax.plot(*zip(*pts), marker="o", label=f"eta = {e}" if e not in ("sigma_hat", "hat") else "sigma-hat")
    ax.set_xscale("log")
    ax.set_xlabel("S (sampling steps)")
    ax.set_ylabel("FID")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(path: str, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


__all__ = ["MODES", "Model", "load_model", "generate", "consistency", "interpolation", "sequence", "reconstruction",
           "fid_table", "format_fid_table", "plot_fid", "save_grid", "schedule_from_dict", "latents", "decode",
           "parse_eta", "write_json"]
