"""Samples from a trained model and runs the paper's experiments.

    python sample.py --workdir=runs/digits                          # 64 DDIM samples, S = 50
    python sample.py --workdir=runs/digits --mode=consistency       # Figure 4
    python sample.py --workdir=runs/digits --mode=interpolation     # Figure 5
    python sample.py --workdir=runs/digits --mode=sequence          # predicted x0 along the trajectory
    python sample.py --workdir=runs/digits --mode=reconstruction    # Table 2's protocol
    python sample.py --workdir=runs/digits --mode=fid --num_samples=2000 --fid_steps=10,20,50 --fid_etas=0,1
    python sample.py --workdir=runs/digits --steps=10 --solver=dpmpp_2m          # DPM-Solver++ (2M)
    python sample.py --workdir=runs/digits_cond --labels=3,7 --guidance=3        # class-conditional, guided
    python sample.py --checkpoint=ckpt/cifar10 --mode=fid --inception_weights=pt_inception-2015-12-05-6726825d.pth

Outputs go to --output (default: <workdir>/<mode>, or <checkpoint>_<mode> beside a model directory,
with the solver, labels and guidance appended when they are not the defaults, e.g. sample_dpmpp_2m_g3);
existing files are kept unless --overwrite, and are then replaced atomically. Sample mode streams to
samples.npy (uint8 [N, H, W, C]) and writes labels.npy for a class-conditional model.
"""

import contextlib
import os
import sys

from absl import app, flags, logging

flags.DEFINE_string("workdir", None, "A training run directory (its EMA params are used).")
flags.DEFINE_string("checkpoint", None, "A model directory (python -m ddim_jax.convert, or a run's model/).")
flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: the newest).")
flags.DEFINE_string("mode", "sample", "sample | consistency | interpolation | sequence | reconstruction | fid")
flags.DEFINE_integer("steps", 50, "Number of sampling steps S.")
flags.DEFINE_string("solver", "ddim", "Sampler: ddim | dpmpp_2m | dpmpp_3m | dpmpp_2m_sde | unipc | plms (eta is "
                    "DDIM's; the others take none).")
flags.DEFINE_string("labels", "all", "Class-conditional models: 'all' (every class in turn), a comma-separated "
                    "list of classes (cycled over the samples), or 'none' (the unconditional model).")
flags.DEFINE_float("guidance", None, "Classifier-free guidance scale for class-conditional models (1 = no "
                   "guidance, 0 = unconditional, > 1 = stronger; default: none).")
flags.DEFINE_string("eta", "0", "eta (0 = DDIM, 1 = DDPM), or 'sigma_hat' for the larger DDPM variance.")
flags.DEFINE_string("spacing", None, "Timestep spacing: uniform | quadratic | leading | trailing | linspace "
                    "| karras | exponential (default: the solver's, uniform for ddim and plms, trailing for dpmpp_*).")
flags.DEFINE_integer("num_samples", None, "Number of samples N (default: 64; 50,000 in fid mode).")
flags.DEFINE_integer("batch_size", 64, "Global batch size (a multiple of the device count).")
flags.DEFINE_integer("seed", 0, "Seed of the latents x_T.")
flags.DEFINE_string("output", None, "Output directory.")
flags.DEFINE_bool("overwrite", False, "Replace existing outputs.")
flags.DEFINE_list("steps_list", ["10", "20", "50", "100", "1000"], "S values for consistency / reconstruction.")
flags.DEFINE_list("fid_steps", ["10", "20", "50", "100"], "S values of the FID table.")
flags.DEFINE_list("fid_etas", ["0.0", "0.2", "0.5", "1.0", "sigma_hat"], "eta values of the FID table (DDIM rows).")
flags.DEFINE_list("fid_solvers", ["ddim"], "Solvers of the FID table: ddim (one row per --fid_etas) and/or "
                  "dpmpp_2m, dpmpp_3m, dpmpp_2m_sde, unipc, plms (one row each).")
flags.DEFINE_string("fid_stats", None, "Reference statistics .npz (default: computed from the training data and cached).")
flags.DEFINE_string("inception_weights", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (local path).")
flags.DEFINE_string("features", None, "Feature extractor for fid: inception | digits (default: digits for the "
                    "digits dataset, else inception).")
flags.DEFINE_string("data_dir", None, "tfds data_dir for reference statistics and reconstruction data.")
flags.DEFINE_string("dtype", "float32", "The network's compute dtype: float32 | bfloat16 (mixed precision on "
                    "accelerators; the sampler's arithmetic stays float32).")
flags.DEFINE_string("compile_cache", None, "Persistent compilation cache directory ('' = off; default: "
                    "$JAX_COMPILATION_CACHE_DIR or ~/.cache/ddim_jax/jax).")
FLAGS = flags.FLAGS


def _outputs(out_dir, names):
    """The output paths, refusing existing ones unless --overwrite (they are replaced atomically)."""
    paths = [os.path.join(out_dir, n) for n in names]
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not FLAGS.overwrite:
        raise FileExistsError(f"{existing[0]} exists (and {len(existing) - 1} more); pass --overwrite or choose "
                              "another --output")
    return paths


@contextlib.contextmanager
def claim_output(out: str):
    """Holds the output directory ``out`` while a run writes there: an ``flock`` on ``out/.sample.lock`` (the
    kernel drops it if the process dies), so a second run on the same directory is refused at once instead
    of both sampling and the later one replacing the other's files. On leaving, the lock file goes, and so
    do the directories this claim created if nothing was written into them (a run that failed)."""
    from ddim_jax import files

    out = os.path.abspath(out)
    created, d = [], out  # the directories the claim creates, innermost first
    while not os.path.exists(d):
        created.append(d)
        d = os.path.dirname(d)
    lock = files.WorkdirLock(out)
    lock.path = os.path.join(out, ".sample.lock")
    try:
        try:
            lock.acquire()
        except files.WorkdirInUse:
            raise FileExistsError(f"--output {out} is being written by {lock.holder()}; wait for it to finish or "
                                  "choose another --output") from None
        try:
            yield out
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock.path)  # while held: a run starting now makes a lock file of its own
            lock.release()
    finally:
        for d in created:  # those still empty: nothing was written there
            try:
                os.rmdir(d)
            except OSError:
                break


def _int_list(name, values):
    try:
        return [int(v) for v in values]
    except ValueError:
        raise ValueError(f"--{name} must be integers; got {','.join(values)}") from None


def reference_name(data: dict) -> str:
    """The cache name of a training set's reference statistics: everything that changes its images
    (dataset, folder, image size, channels, crop), so statistics of other images are never reused."""
    if data["dataset"] == "digits":  # 8x8, or upscaled to data.image_size
        size = data.get("image_size", 8)
        return "digits-train" if size == 8 else f"digits-train-{size}px"
    where = data.get("folder", "") if data["dataset"] == "folder" else ""
    tag = f"{data['dataset']}{'-' + where.strip('/').replace('/', '_') if where else ''}-train"
    return f"{tag}-{data['image_size']}px-{data.get('channels', 3)}ch-{data.get('crop', 'center')}"


def _dataset_images(model, split, num):
    """uint8 images of the model's training dataset (``split``) as training saw them (size, channels), at
    most ``num``."""
    import ml_collections

    from ddim_jax import data as data_lib

    d = model.data
    if not d:
        raise ValueError("this mode needs the training data, which a converted checkpoint does not name; "
                         "use --workdir")
    if FLAGS.data_dir:
        d["data_dir"] = FLAGS.data_dir
    d["split"] = split
    src = data_lib.make_source(ml_collections.ConfigDict(d))
    return src.get(range(min(num, len(src))))


# ---------------------------------------------------------------------------------------------
# The modes: each takes (model, settings, output directory) and writes its files atomically.


def _grid(images, path, ncol=None):
    from ddim_jax.images import save_grid

    save_grid(images, path, ncol=ncol, scale=max(1, 64 // images.shape[2]))


def run_sample(ex, model, a, out):
    """Exactly N samples streamed to samples.npy (uint8 [N, H, W, C]) and the first 100 as samples.png."""
    import numpy as np

    from ddim_jax import files

    npy_path, grid_path = _outputs(out, ["samples.npy", "samples.png"])
    from ddim_jax.parallel import on_main

    shape = (a.num, model.image_size, model.image_size, model.channels)
    size = int(np.prod(shape, dtype=np.int64))

    def check_disk():
        if size > files.free_disk(out) - (64 << 20):
            raise ValueError(f"--num_samples={a.num} needs {size / 2**30:.1f} GiB in {out}; "
                             f"{files.free_disk(out) / 2**30:.1f} GiB are free")

    on_main(check_disk, "checking the disk")
    batches = ex.sample_batches(model, a.num, a.batch_size, a.steps, solver=a.solver, eta=a.eta,
                                sigma_hat=a.sigma_hat, spacing=a.spacing, seed=a.seed, **a.cond)
    if not a.is_main:  # every process takes part in the sharded sampling; process 0 writes
        for _ in batches:
            pass
        return
    first = []
    with files.atomic_path(npy_path) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        for start, imgs in batches:
            arr[start:start + len(imgs)] = imgs
            first.extend(imgs[:100 - len(first)])
        arr.flush()
        del arr
    sources = a.cond.get("sources")
    if sources is None:
        _grid(np.stack(first), grid_path)
    else:  # what the model was given, its samples, the held-out images they came from
        k = min(10, len(first))
        _grid(np.concatenate([_observed(model, sources[:k]), np.stack(first[:k]), sources[:k]]), grid_path, ncol=k)
    labels = ex.class_labels(model, a.cond["labels"], a.num)
    if labels is not None:
        files.atomic_write(os.path.join(out, "labels.npy"), lambda f: np.save(f, labels))
    grid = "a grid" if sources is None else "a grid (rows: the observations, the samples, the originals)"
    print(f"wrote {a.num} samples to {npy_path}{'' if labels is None else ' (their labels in labels.npy)'} and "
          f"{grid} to {grid_path}")


def _observed(model, images):
    """uint8 pictures of what a concat-conditioned model is given of ``images`` (at their size)."""
    import numpy as np

    from ddim_jax import concat
    from ddim_jax.images import from_uint8, to_uint8

    cond = concat.get(model.spec.concat)
    x = from_uint8(images)
    return to_uint8(np.asarray(cond.condition(cond.observe(x), images.shape[1]))[..., :images.shape[-1]])


def _grid_mode(name, compute, caption):
    """A mode whose result is a grid ``[rows, columns, H, W, C]`` written to ``name``."""

    def run(ex, model, a, out):
        (path,) = _outputs(out, [name])
        grid = compute(ex, model, a)
        if a.is_main:
            _grid(grid.reshape((-1,) + grid.shape[2:]), path, ncol=grid.shape[1])
            print(f"{caption(a)}wrote {path}")

    return run


run_consistency = _grid_mode(  # Figure 4: the same x_T decoded with each S
    "consistency.png", lambda ex, m, a: ex.consistency(m, min(a.num, 8), a.steps_list, seed=a.seed, spacing=a.spacing,
                                                       solver=a.solver, **a.cond),
    lambda a: f"rows: S = {', '.join(map(str, a.steps_list))}; ")
run_interpolation = _grid_mode(  # Figure 5: slerp between pairs of x_T
    "interpolation.png", lambda ex, m, a: ex.interpolation(m, max(1, min(a.num, 16) // 2), 11, a.steps, seed=a.seed,
                                                           spacing=a.spacing, solver=a.solver, **a.cond),
    lambda a: "")
run_sequence = _grid_mode(  # the predicted x0 along the trajectory
    "sequence.png", lambda ex, m, a: ex.sequence(m, min(a.num, 8), a.steps, seed=a.seed, spacing=a.spacing, **a.cond),
    lambda a: f"rows: samples; columns: predicted x0 along {a.steps} steps, then the sample; ")


def run_reconstruction(ex, model, a, out):
    import numpy as np

    from ddim_jax import files

    json_path, grid_path = _outputs(out, ["reconstruction.json", "reconstruction.png"])
    images = _dataset_images(model, "test", a.num)
    errors, recons = ex.reconstruction(model, images, a.steps_list, a.batch_size, spacing=a.spacing)
    if a.is_main:
        k, rows = min(len(images), 10), list(errors)  # each S, then a latent model's autoencoder alone
        _grid(np.concatenate([images[:k]] + [recons[s][:k] for s in rows]), grid_path, ncol=k)
        files.write_json(json_path, {"num_images": len(images), "spacing": a.spacing or "uniform",
                                     "mse_per_dim_0_1": {str(s): e for s, e in errors.items()}})
        print("| S | " + " | ".join(map(str, rows)) + " |")
        print("|---" * (len(rows) + 1) + "|")
        print("| MSE | " + " | ".join(f"{errors[s]:.2e}" for s in rows) + " |")
        extra = "; last row: the autoencoder alone" if "autoencoder" in errors else ""
        print(f"wrote {json_path} and {grid_path} (first row: originals; then one row per S{extra})")


def run_fid(ex, model, a, out):
    from ddim_jax import files
    from ddim_jax import fid as fid_lib

    json_path, md_path, plot_path = _outputs(out, ["fid.json", "fid.md", "fid.png"])
    stats = fid_lib.load_stats(FLAGS.fid_stats) if FLAGS.fid_stats else None
    digits = model.data.get("dataset") == "digits"
    feat_name = FLAGS.features or ("digits" if digits else "inception")
    extractor = (fid_lib.feature_extractor("inception", weights=FLAGS.inception_weights)
                 if feat_name == "inception" else fid_lib.feature_extractor(feat_name))
    if stats:
        mu, sigma, _ = stats
        if mu.shape != (extractor.dim,):
            raise ValueError(f"--fid_stats {FLAGS.fid_stats} holds {len(mu)}-d statistics; {extractor.name} features "
                             f"are {extractor.dim}-d (--features)")
    else:
        if not model.data:
            raise ValueError("--fid_stats is required for a model that does not name its training data "
                             "(a converted checkpoint)")
        mu, sigma = fid_lib.reference_stats(reference_name(model.data),
                                            lambda: _dataset_images(model, "train", 10**9), extractor)
    rows = ex.fid_table(model, extractor, (mu, sigma), a.num, a.batch_size, a.fid_steps, FLAGS.fid_etas,
                        spacing=a.spacing, solvers=FLAGS.fid_solvers, seed=a.seed, **a.cond)
    if a.is_main:
        table = ex.format_fid_table(rows)
        files.write_json(json_path, {"features": extractor.name, "spacing": a.spacing, "labels": FLAGS.labels,
                                     "guidance": FLAGS.guidance, "rows": rows})
        cond = f", labels {FLAGS.labels}, guidance {FLAGS.guidance}" if model.num_classes is not None else ""
        spacing = f"{a.spacing} spacing" if a.spacing else "each solver's default spacing"
        files.write_text(md_path, f"FID ({extractor.name} features, {a.num} samples, {spacing}{cond})\n\n"
                                  f"{table}\n")
        ex.plot_fid(rows, plot_path)
        print(table)
        print(f"wrote {json_path}, {md_path}, {plot_path}")


MODES = {"sample": run_sample, "consistency": run_consistency, "interpolation": run_interpolation,
         "sequence": run_sequence, "reconstruction": run_reconstruction, "fid": run_fid}


def parse_conditioning(num_classes):
    """``{"labels": ..., "guidance": ...}`` for the experiments from --labels and --guidance. ``num_classes``:
    the model's (None = unconditional; ``False`` = not loaded yet, so only the syntax is checked)."""
    text = FLAGS.labels.strip().lower()
    if text in ("all", "none"):
        labels = None if text == "none" else "all"
    else:
        try:
            labels = [int(v) for v in text.split(",")]
        except ValueError:
            raise ValueError(f"--labels must be 'all', 'none' or comma-separated class numbers; got {FLAGS.labels!r}"
                             ) from None
    if num_classes is False:
        return {}
    if num_classes is None:
        if FLAGS.guidance is not None or text != "all":
            raise ValueError("--labels and --guidance apply to class-conditional models; this model is unconditional")
        return {"labels": None, "guidance": None}
    bad = [v for v in labels if not 0 <= v < num_classes] if isinstance(labels, list) else []
    if bad:
        raise ValueError(f"--labels must be classes in [0, {num_classes}); got {bad[0]}")
    if FLAGS.guidance is not None and labels is None:
        raise ValueError("--guidance needs classes to guide towards; --labels=none is the unconditional model")
    return {"labels": labels, "guidance": FLAGS.guidance}


def _output_name(mode: str) -> str:
    """``mode`` with the settings that are not the defaults: e.g. sample_dpmpp_2m_labels3-7_g3."""
    from ddim_jax.solvers import resolve_spacing

    parts = [mode]
    if FLAGS.solver != "ddim" and mode != "fid":
        parts.append(FLAGS.solver)
    if FLAGS.spacing is not None and (mode == "fid" or FLAGS.spacing != resolve_spacing(FLAGS.solver, None)):
        parts.append(FLAGS.spacing)
    if FLAGS.dtype != "float32":
        parts.append(FLAGS.dtype)
    if FLAGS.labels.strip().lower() != "all":
        parts.append("labels" + FLAGS.labels.strip().lower().replace(",", "-"))
    if FLAGS.guidance is not None:
        parts.append(f"g{FLAGS.guidance:g}")
    return "_".join(parts)


def parse_settings(T: int | None = None, num_classes=False):
    """The validated flags (one-line ValueErrors); step counts are checked against the model's T and the
    labels against its classes when given."""
    import math
    import types

    from ddim_jax import experiments as ex
    from ddim_jax import loading
    from ddim_jax.models import COMPUTE_DTYPES
    from ddim_jax.schedules import SPACINGS
    from ddim_jax.solvers import SOLVERS

    if FLAGS.mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}; got {FLAGS.mode!r}")
    if FLAGS.spacing is not None and FLAGS.spacing not in SPACINGS:
        raise ValueError(f"--spacing must be one of {', '.join(SPACINGS)}; got {FLAGS.spacing!r}")
    if (FLAGS.workdir is None) == (FLAGS.checkpoint is None):
        raise ValueError("give exactly one of --workdir (a training run) or --checkpoint (a model directory)")
    if FLAGS.checkpoint is not None and FLAGS.step is not None:
        raise ValueError("--step picks a checkpoint of a --workdir; a --checkpoint holds one set of parameters")
    n = FLAGS.num_samples if FLAGS.num_samples is not None else (50_000 if FLAGS.mode == "fid" else 64)
    if n <= 0:
        raise ValueError(f"--num_samples must be >= 1; got {n}")
    if FLAGS.batch_size <= 0:
        raise ValueError(f"--batch_size must be >= 1; got {FLAGS.batch_size}")
    eta, sigma_hat = ex.parse_eta(FLAGS.eta)
    if FLAGS.dtype not in COMPUTE_DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(COMPUTE_DTYPES)}; got {FLAGS.dtype!r}")
    for name in FLAGS.fid_etas:
        ex.parse_eta(name)
    for name, values in (("solver", [FLAGS.solver]), ("fid_solvers", FLAGS.fid_solvers)):
        bad = [v for v in values if v not in SOLVERS]
        if bad or not values:
            raise ValueError(f"--{name} must be among {', '.join(SOLVERS)}; got {','.join(values)!r}")
    if FLAGS.solver != "ddim" and (eta != 0 or sigma_hat):
        raise ValueError(f"--eta applies to --solver=ddim only; {FLAGS.solver} is deterministic (leave --eta at 0)")
    if FLAGS.mode == "reconstruction" and (FLAGS.guidance is not None or FLAGS.labels.strip().lower() != "all"):
        raise ValueError("--mode=reconstruction encodes and decodes with the unconditional model; --labels and "
                         "--guidance do not apply")
    if FLAGS.solver != "ddim" and FLAGS.mode in ("sequence", "reconstruction"):
        raise ValueError(f"--mode={FLAGS.mode} uses DDIM (its trajectory, its encoder); --solver applies to the "
                         "sample, consistency, interpolation and fid modes")
    if FLAGS.guidance is not None and not math.isfinite(FLAGS.guidance):
        raise ValueError(f"--guidance must be a finite number (1 = no guidance); got {FLAGS.guidance}")
    a = types.SimpleNamespace(num=n, eta=eta, sigma_hat=sigma_hat, solver=FLAGS.solver, spacing=FLAGS.spacing,
                              seed=FLAGS.seed,
                              cond=parse_conditioning(False if FLAGS.mode == "reconstruction" else num_classes),
                              steps=FLAGS.steps, batch_size=FLAGS.batch_size,
                              steps_list=_int_list("steps_list", FLAGS.steps_list),
                              fid_steps=_int_list("fid_steps", FLAGS.fid_steps))
    checked = {"steps": [a.steps]}
    if FLAGS.mode in ("consistency", "reconstruction"):
        checked["steps_list"] = a.steps_list
    if FLAGS.mode == "fid":
        checked["fid_steps"] = a.fid_steps
    for name, values in checked.items():
        bad = [s for s in values if not 1 <= s <= (T or float("inf"))]
        if bad:
            raise ValueError(f"--{name} must be in [1, {T or 'T'}] (the model's T); got {bad[0]}")
    return a


def run():
    import jax

    from ddim_jax import experiments as ex
    from ddim_jax import loading
    from ddim_jax.parallel import on_main

    parse_settings()  # flag errors before loading anything
    model = loading.load_model(FLAGS.workdir or FLAGS.checkpoint, step=FLAGS.step, dtype=FLAGS.dtype)
    a = parse_settings(model.schedule.num_timesteps, model.num_classes)
    a.is_main = jax.process_index() == 0
    if model.spec.concat is not None:  # conditioned by concatenation: on held-out images' observations
        if FLAGS.mode != "sample":
            raise ValueError(f"--mode={FLAGS.mode} is not offered for a concat-conditioned model "
                             f"({model.spec.concat}); --mode=sample draws from held-out images' observations")
        a.cond["sources"] = _dataset_images(model, "test", a.num)
    # Outputs never go inside a model directory (replacing a model replaces the whole directory).
    name = _output_name(FLAGS.mode)
    out = FLAGS.output or (os.path.join(FLAGS.workdir, name) if FLAGS.workdir
                           else os.path.normpath(FLAGS.checkpoint) + f"_{name}")
    print(f"model: {model.source}; {jax.device_count()} {jax.devices()[0].platform} device(s), "
          f"{jax.process_count()} process(es)", flush=True)
    with contextlib.ExitStack() as claim:  # process 0 writes, so it alone holds the output directory
        on_main(lambda: claim.enter_context(claim_output(out)), "claiming --output")
        MODES[FLAGS.mode](ex, model, a, out)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
    from ddim_jax.cache import enable_compilation_cache

    enable_compilation_cache(FLAGS.compile_cache)
    try:
        run()
    except (ValueError, OSError, RuntimeError) as e:  # OSError: missing, unreadable, read-only or full
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
