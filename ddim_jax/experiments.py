"""The paper's experiments on a trained model: sampling, consistency, interpolation, the x0
sequence, reconstruction (Table 2) and FID (Table 1). ``sample.py`` is the command line over these.

Every batch is sharded over all devices of all hosts, on the model's ``('data', 'fsdp')`` mesh; the
parameters are split over ``'fsdp'`` as in training (:func:`ddim_jax.parallel.fsdp_spec`) and the compiled
samplers, given arrays in those shardings, gather them where the network needs them. x_T of sample ``i`` is
drawn from ``fold_in(key(seed), i)``, so a seed gives the same images whatever the device count, mesh
shape and batch size (with eta > 0 the per-step noise is drawn per batch, so it depends on the batch size,
not on the device count or mesh; with ``fsdp > 1`` the images agree to float32 round-off).

Class-conditional models take ``labels`` (one per sample, see :func:`class_labels`; None = the
unconditional model) and an optional classifier-free ``guidance`` scale (1 = no guidance) in every
experiment; both are arguments of the compiled sampler, so changing them does not recompile.

Latent diffusion models run every experiment in their autoencoder's latent space (x_T, slerp, the
trajectory, DDIM's encoder) and decode to images at the end; x0 is not clipped there (latents are not
bounded like pixels).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax import fid as fid_lib
from ddim_jax import files
from ddim_jax.conditioning import check_labels
from ddim_jax.distillation import consistency_sample
from ddim_jax.images import from_uint8, save_grid, to_uint8
from ddim_jax.models import ModelSpec, compute_dtype
from ddim_jax.parallel import as_train_mesh, fsdp_shardings, gather_rows, pad_rows, round_up, shard_rows
from ddim_jax.sampling import ddim_encode, ddim_sample, slerp
from ddim_jax.schedules import Schedule, make_timesteps
from ddim_jax.solvers import resolve_spacing, sample


@dataclasses.dataclass
class Model:
    """A trained network ready to sample: its spec and its params on ``mesh``, a ``('data', 'fsdp')`` mesh
    (:func:`ddim_jax.parallel.train_mesh`; a 1-D ``'data'`` mesh is taken as ``fsdp = 1``): each array split
    over ``'fsdp'`` by :func:`ddim_jax.parallel.fsdp_spec`, the training rule, and replicated over ``'data'``
    (all replicated when ``fsdp = 1``); batches are split over all the devices. The network computes in
    ``dtype`` (``"bfloat16"`` on accelerators: about half the memory traffic; the sampler's own arithmetic
    stays float32)."""

    spec: ModelSpec
    params: Any
    mesh: jax.sharding.Mesh
    dtype: str = "float32"

    def __post_init__(self):
        compute_dtype(self.dtype)  # a bad name fails here
        self.mesh = as_train_mesh(self.mesh)
        self.params = jax.device_put(self.params, fsdp_shardings(self.params, self.mesh))
        self.schedule: Schedule = self.spec.make_schedule()
        self.clip_x0 = 1.0 if self.spec.autoencoder is None else None  # the paper's clipping, in pixel space only
        self._decode = jax.jit(self.spec.decode)
        self._encode = jax.jit(self.spec.encode)
        self._condition = jax.jit(lambda x: self.spec.condition(self.spec.observe(x)))

    def to_images(self, x):
        """Samples -> images in about [-1, 1] (a latent model's autoencoder decodes them)."""
        return x if self.spec.autoencoder is None else self._decode(self.params, x)

    def from_images(self, x):
        """Images in [-1, 1] -> the diffusion's space (a latent model's scaled posterior means)."""
        return x if self.spec.autoencoder is None else self._encode(self.params, x)

    @property
    def eps_fn(self):
        """The unconditional ``eps_fn(x, t)`` (a class-conditional model's null label)."""
        return self.conditioned()

    def conditioned(self, y=None, guidance=None, concat=None):
        """``eps_fn(x, t)`` for labels ``y`` (sharded like the batch, or None), a guidance scale and a
        concat-conditioned model's extra channels (:meth:`condition_of`)."""
        return self.spec.eps_fn(self.params, y, guidance, dtype=self.dtype, concat=concat)

    def condition_of(self, images):
        """A concat-conditioned model's extra channels for images in [-1, 1]: what it is given of them."""
        return self._condition(images)

    @property
    def num_classes(self) -> int | None:
        return self.spec.num_classes

    @property
    def image_size(self) -> int:
        """The generated images' side (a latent model's: its autoencoder's images)."""
        return self.spec.output_shape[0]

    @property
    def channels(self) -> int:
        return self.spec.output_shape[2]

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """What the sampler denoises: images, or a latent model's latents."""
        return self.spec.sample_shape

    @property
    def prediction_type(self) -> str:
        return self.spec.prediction_type

    @property
    def data(self) -> dict:
        """The data block of the training config (empty for converted checkpoints)."""
        return dict(self.spec.info.get("data") or {})

    @property
    def source(self) -> str:
        return str(self.spec.info.get("source", "?"))


# ---------------------------------------------------------------------------------------------
# Sharded building blocks.


def check_batch(model: Model, batch_size: int) -> None:
    """A batch size that divides over the devices and whose float32 buffers fit in host memory."""
    n = model.mesh.devices.size
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1 or batch_size % n:
        raise ValueError(f"batch_size must be a positive multiple of the number of devices ({n}); got {batch_size}")
    need = batch_size * model.image_size ** 2 * model.channels * 4 * 8  # x_T, x, x0, eps and the model's inputs
    have = files.available_memory()
    if need > have:
        raise ValueError(f"batch_size={batch_size} needs about {need / 2**30:.1f} GiB for "
                         f"{model.image_size}x{model.image_size}x{model.channels} samples; {have / 2**30:.1f} GiB "
                         "are available: use a smaller batch_size")


def class_labels(model: Model, labels, num: int) -> np.ndarray | None:
    """Per-sample labels ``[num]`` for ``labels``: ``"all"`` (every class in turn: sample ``i`` gets
    ``i % num_classes``), a class or a list of classes (cycled), or None (the unconditional model,
    via the null label). An unconditional model takes None only."""
    if labels is None:
        return None
    if model.num_classes is None:
        raise ValueError("labels apply to class-conditional models; this model is unconditional")
    if isinstance(labels, str):
        if labels != "all":
            raise ValueError(f"labels must be 'all', a class, a list of classes or None; got {labels!r}")
        return np.arange(num, dtype=np.int32) % model.num_classes
    arr = np.atleast_1d(np.asarray(labels))
    if arr.size == 0:
        raise ValueError("labels is empty")
    check_labels(arr, model.num_classes)
    return np.resize(arr.astype(np.int32), num)


def _rows(labels, start: int, count: int, mesh):
    """Labels ``start .. start + count - 1`` (zero-padded past the end) sharded like a batch, or None."""
    if labels is None:
        return None
    return shard_rows(pad_rows(labels[start:start + count], count), mesh)[0]


def _check_sources(model: Model, sources):
    if (sources is None) != (model.spec.concat is None):
        raise ValueError(f"this model is conditioned by concatenation ({model.spec.concat}): give sources, the "
                         "images whose observations condition the samples" if model.spec.concat else
                         "sources apply to concat-conditioned models only")
    if sources is None:
        return None
    sources = np.asarray(sources)
    want = (model.image_size, model.image_size, model.channels)
    if sources.ndim != 4 or sources.shape[1:] != want or len(sources) < 1 or sources.dtype != np.uint8:
        raise ValueError(f"sources must be uint8 images [N, {want[0]}, {want[1]}, {want[2]}] with N >= 1; got "
                         f"{sources.dtype} {sources.shape}")
    return sources


def _conditions(model: Model, sources, start: int, count: int):
    """The extra channels of samples ``start .. start + count - 1`` (source ``i mod N``), sharded, or None."""
    if sources is None:
        return None
    rows = from_uint8(sources[np.arange(start, start + count) % len(sources)])
    return model.condition_of(shard_rows(rows, model.mesh)[0])


def _noise_key(seed: int):
    """The key of the samplers' per-step noise (eta > 0, sigma_hat, SDE solvers), apart from x_T's."""
    return jax.random.fold_in(jax.random.key(seed), 1 << 30)


@functools.partial(jax.jit, static_argnames="shape")
def _draw_latents(key, idx, shape):
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape))(idx)


def latents(model: Model, start: int, count: int, seed: int):
    """x_T of samples ``start .. start + count - 1``, ``[count, H, W, C]``, sharded over the batch
    (``count`` must divide by the device count)."""
    idx, _ = shard_rows(np.arange(start, start + count, dtype=np.int32), model.mesh)
    return _draw_latents(jax.random.key(seed), idx, model.sample_shape)


def decode(model: Model, x_T, num_steps: int, *, solver: str = "ddim", eta: float = 0.0, sigma_hat: bool = False,
           spacing: str | None = None, key=None, clip_x0="model", return_trajectory: bool = False,
           y=None, guidance=None, concat=None):
    """Images decoded from sharded x_T with the model and ``solver`` (see :func:`ddim_jax.solvers.sample`);
    ``clip_x0="model"`` clips x0 to [-1, 1] in pixel space, like the paper's code, and not in a latent
    space. ``return_trajectory`` is DDIM's (x0, x_T, predicted x0 per step; all decoded to images).
    ``y``: labels sharded like ``x_T`` (or None), ``guidance``: a classifier-free guidance scale (or None),
    ``concat``: a concat-conditioned model's extra channels, sharded like ``x_T``.
    ``spacing=None`` is the solver's default (``ddim_jax.solvers.DEFAULT_SPACING``)."""
    if spacing is None and model.spec.distilled is not None:
        spacing = model.spec.distilled["spacing"]  # a distilled student's own timesteps
    spacing = resolve_spacing(solver, spacing)
    clip_x0 = model.clip_x0 if isinstance(clip_x0, str) and clip_x0 == "model" else clip_x0
    eps_fn = model.conditioned(y, guidance, concat)
    if model.spec.is_consistency and solver == "ddim" and not return_trajectory and eta == 0 and not sigma_hat:
        tau = make_timesteps(model.schedule.num_timesteps, num_steps, spacing, schedule=model.schedule)
        return model.to_images(consistency_sample(eps_fn, model.schedule, x_T, tau, key, clip_x0=clip_x0))
    if return_trajectory:
        if solver != "ddim":
            raise ValueError(f"the trajectory of predicted x0 is drawn with DDIM; got solver={solver!r}")
        x0, x_T, preds = ddim_sample(eps_fn, model.schedule, x_T, num_steps, eta=eta, sigma_hat=sigma_hat,
                                     spacing=spacing, key=key, clip_x0=clip_x0, prediction_type=model.prediction_type,
                                     return_trajectory=True)
        if model.spec.autoencoder is not None:
            preds = jax.vmap(model.to_images)(preds)  # every step's x0 in one call
        return model.to_images(x0), x_T, preds
    return model.to_images(sample(eps_fn, model.schedule, x_T, num_steps, solver=solver, eta=eta, sigma_hat=sigma_hat,
                                  spacing=spacing, key=key, clip_x0=clip_x0, prediction_type=model.prediction_type))


def sample_batches(model: Model, num: int, batch_size: int, num_steps: int, *, solver: str = "ddim",
                   eta: float = 0.0, sigma_hat: bool = False, spacing: str | None = None, seed: int = 0,
                   clip_x0="model", labels=None, guidance=None, sources=None, progress: bool = True,
                   desc: str = "sampling"):
    """Yields ``(start, uint8 samples)`` for samples ``0 .. num - 1`` in batches of ``batch_size`` (the last
    batch padded and trimmed, so every batch has one shape and one compilation). Memory use does not grow
    with ``num``. ``labels``: see :func:`class_labels`; ``guidance``: a classifier-free guidance scale.
    ``sources``: a concat-conditioned model's uint8 images (the generated images' shape); sample ``i`` is
    drawn given what the model observes of source ``i mod len(sources)`` (e.g. its low-resolution version)."""
    from tqdm.auto import tqdm

    if not isinstance(num, (int, np.integer)) or num < 1:
        raise ValueError(f"the number of samples must be >= 1; got {num}")
    check_batch(model, batch_size)
    labels = class_labels(model, labels, num)
    sources = _check_sources(model, sources)
    noise_key = _noise_key(seed)
    with tqdm(total=num, desc=desc, unit="img", disable=not progress or jax.process_index() != 0) as bar:
        for b, start in enumerate(range(0, num, batch_size)):
            x = decode(model, latents(model, start, batch_size, seed), num_steps, solver=solver, eta=eta,
                       sigma_hat=sigma_hat, spacing=spacing, key=jax.random.fold_in(noise_key, b), clip_x0=clip_x0,
                       y=_rows(labels, start, batch_size, model.mesh), guidance=guidance,
                       concat=_conditions(model, sources, start, batch_size))
            k = min(batch_size, num - start)
            yield start, to_uint8(gather_rows(x, k))
            bar.update(k)


def generate(model: Model, num: int, batch_size: int, num_steps: int, **kwargs) -> np.ndarray:
    """Exactly ``num`` uint8 samples ``[num, H, W, C]`` (see :func:`sample_batches` for the options)."""
    if isinstance(num, (int, np.integer)) and num >= 1:
        need = num * model.image_size ** 2 * model.channels
        if need > files.available_memory():
            raise ValueError(f"{num} samples need {need / 2**30:.1f} GiB; write them in batches with sample_batches")
    out = None
    for start, imgs in sample_batches(model, num, batch_size, num_steps, **kwargs):
        if out is None:
            out = np.empty((num,) + imgs.shape[1:], np.uint8)
        out[start:start + len(imgs)] = imgs
    return out


# ---------------------------------------------------------------------------------------------
# Experiments.


def consistency(model: Model, num: int, steps: Sequence[int], *, seed: int = 0, spacing: str | None = None,
                solver: str = "ddim", labels=None, guidance=None):
    """The same ``num`` latents decoded with each S in ``steps`` (Figure 4): uint8 ``[len(steps), num, ...]``."""
    rows = round_up(num, model.mesh.devices.size)
    x_T, y = latents(model, 0, rows, seed), _rows(class_labels(model, labels, num), 0, rows, model.mesh)
    return np.stack([to_uint8(gather_rows(decode(model, x_T, s, solver=solver, spacing=spacing, key=_noise_key(seed),
                                                  y=y, guidance=guidance), num)) for s in steps])


def interpolation(model: Model, pairs: int, num_points: int, num_steps: int, *, seed: int = 0,
                  spacing: str | None = None, solver: str = "ddim", labels=None, guidance=None):
    """Slerp between latent pairs (Figure 5), decoded with ``solver``: uint8 ``[pairs, num_points, ...]``.
    Pair ``i`` is decoded with the label of sample ``i`` (see :func:`class_labels`)."""
    z = gather_rows(latents(model, 0, round_up(2 * pairs, model.mesh.devices.size), seed))
    alphas = np.linspace(0.0, 1.0, num_points)
    path = np.concatenate([np.asarray(slerp(z[2 * i], z[2 * i + 1], alphas)) for i in range(pairs)])
    x, n = shard_rows(path, model.mesh)
    per_pair = class_labels(model, labels, pairs)
    y = None if per_pair is None else _rows(np.repeat(per_pair, num_points), 0, x.shape[0], model.mesh)
    out = to_uint8(gather_rows(decode(model, x, num_steps, solver=solver, spacing=spacing, key=_noise_key(seed),
                                      y=y, guidance=guidance), n))
    return out.reshape((pairs, num_points) + out.shape[1:])


def sequence(model: Model, num: int, num_steps: int, columns: int = 10, *, seed: int = 0, spacing: str | None = None,
             labels=None, guidance=None):
    """The predicted x0 along the trajectory: uint8 ``[num, columns + 1, ...]`` (columns evenly spaced steps
    and the final sample)."""
    rows = round_up(num, model.mesh.devices.size)
    x_T, y = latents(model, 0, rows, seed), _rows(class_labels(model, labels, num), 0, rows, model.mesh)
    x0, _, x0_preds = decode(model, x_T, num_steps, spacing=spacing, return_trajectory=True, y=y, guidance=guidance)
    cols = np.unique(np.linspace(0, num_steps - 1, min(columns, num_steps)).round().astype(int))
    preds = gather_rows(jnp.moveaxis(x0_preds[cols], 0, 1), num)
    return to_uint8(np.concatenate([preds, gather_rows(x0, num)[:, None]], axis=1))


def reconstruction(model: Model, images: np.ndarray, steps: Sequence[int], batch_size: int, *,
                   spacing: str | None = None, progress: bool = True):
    """Encode uint8 ``images`` to x_T and decode, for each S: ``({S: per-dimension MSE on [0, 1]},
    {S: reconstructions uint8})`` (the protocol of the paper's Table 2). A latent model encodes the
    images to latents first and decodes the result; its autoencoder alone (image -> latents -> image) is
    then the entry ``"autoencoder"``, the floor every S is measured against."""
    from tqdm.auto import tqdm

    check_batch(model, batch_size)
    spacing = resolve_spacing("ddim", spacing)
    x = from_uint8(images)
    errors, recons = {}, {}
    for s in list(steps) + (["autoencoder"] if model.spec.autoencoder is not None else []):
        sq, out = 0.0, []
        for start in tqdm(range(0, len(x), batch_size), desc=f"reconstruct S={s}", disable=not progress):
            chunk = pad_rows(x[start:start + batch_size], batch_size)
            x0, _ = shard_rows(chunk, model.mesh)
            k = min(batch_size, len(x) - start)
            if s == "autoencoder":
                rec = gather_rows(model.to_images(model.from_images(x0)), k)
            else:
                x_T = ddim_encode(model.eps_fn, model.schedule, model.from_images(x0), s, spacing=spacing,
                                  prediction_type=model.prediction_type)
                rec = gather_rows(decode(model, x_T, s, spacing=spacing, clip_x0=None), k)
            sq += float(np.sum(((np.clip(rec, -1, 1) + 1) / 2 - (chunk[:k] + 1) / 2) ** 2))
            out.append(to_uint8(rec))
        errors[s] = sq / x.size
        recons[s] = np.concatenate(out)
    return errors, recons


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
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0 or 'sigma_hat'; got {value!r}")
    return eta, False


def fid_settings(etas: Sequence[str], solvers: Sequence[str] = ("ddim",)) -> list[tuple[str, str, str]]:
    """``(label, solver, eta)`` rows of a FID table: DDIM once per eta, every other solver once."""
    rows = [(f"eta={e}" if e not in ("sigma_hat", "hat") else "sigma_hat", "ddim", e) for e in etas
            if "ddim" in solvers]
    return rows + [(s, s, "0") for s in solvers if s != "ddim"]


def fid_table(model: Model, extractor, reference: tuple[np.ndarray, np.ndarray], num: int, batch_size: int,
              steps: Sequence[int], etas: Sequence[str], *, spacing: str | None = None,
              solvers: Sequence[str] = ("ddim",), seed: int = 0, labels=None, guidance=None,
              progress: bool = True) -> list[dict]:
    """FID of ``num`` samples for each sampler (DDIM at each eta, each other solver) and S, against
    reference statistics (mu, sigma); each solver on ``spacing`` or its default. Only the features of
    each batch are kept."""
    rows = []
    for label, solver, eta_s in fid_settings(etas, solvers):
        eta, hat = parse_eta(eta_s)
        for s in steps:
            feats = np.concatenate([
                extractor.extract(imgs, batch_size=max(batch_size, 50), progress=False)
                for _, imgs in sample_batches(model, num, batch_size, s, solver=solver, eta=eta, sigma_hat=hat,
                                              spacing=spacing, seed=seed, labels=labels, guidance=guidance,
                                              progress=progress, desc=f"{label} S={s}")])
            mu, sigma = fid_lib.compute_stats(feats)
            rows.append({"sampler": label, "solver": solver, "eta": eta_s, "steps": s, "num_samples": num,
                         "spacing": resolve_spacing(solver, spacing), "guidance": guidance, "dtype": model.dtype,
                         "fid": fid_lib.fid_from_stats(mu, sigma, *reference)})
    return rows


def format_fid_table(rows: list[dict]) -> str:
    steps = sorted({r["steps"] for r in rows})
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    val = {(r["sampler"], r["steps"]): r["fid"] for r in rows}
    lines = ["| sampler \\ S | " + " | ".join(map(str, steps)) + " |", "|---" * (len(steps) + 1) + "|"]
    for e in samplers:
        lines.append(f"| {e} | " + " | ".join(f"{val[e, s]:.2f}" for s in steps) + " |")
    return "\n".join(lines)


def plot_fid(rows: list[dict], path: str):
    """FID against S, one line per sampler (Figure 3, left), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for e in dict.fromkeys(r["sampler"] for r in rows):
        pts = sorted((r["steps"], r["fid"]) for r in rows if r["sampler"] == e)
        ax.plot(*zip(*pts), marker="o", label=e)
    ax.set_xscale("log")
    ax.set_xlabel("S (sampling steps)")
    ax.set_ylabel("FID")
    ax.legend()
    fig.tight_layout()
    files.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


__all__ = ["Model", "check_batch", "generate", "sample_batches", "consistency",
           "interpolation", "sequence", "reconstruction", "fid_table", "format_fid_table", "plot_fid", "save_grid",
           "latents", "decode", "parse_eta", "fid_settings", "class_labels"]
