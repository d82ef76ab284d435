"""Samples from a trained model and runs the paper's experiments.

    python sample.py --workdir=runs/digits                          # 64 DDIM samples, S = 50
    python sample.py --workdir=runs/digits --mode=consistency       # Figure 4
    python sample.py --workdir=runs/digits --mode=interpolation     # Figure 5
    python sample.py --workdir=runs/digits --mode=sequence          # predicted x0 along the trajectory
    python sample.py --workdir=runs/digits --mode=reconstruction    # Table 2's protocol
    python sample.py --workdir=runs/digits --mode=fid --num_samples=2000 --fid_steps=10,20,50 --fid_etas=0,1
    python sample.py --checkpoint=ckpt/cifar10 --mode=fid --inception_weights=pt_inception-2015-12-05-6726825d.pth

Outputs go to --output (default: <workdir or checkpoint>/<mode>); existing files are kept unless
--overwrite.
"""

import os
import sys

from absl import app, flags, logging

flags.DEFINE_string("workdir", None, "A training run directory (its EMA params are used).")
flags.DEFINE_string("checkpoint", None, "A checkpoint written by python -m ddim_jax.convert.")
flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: the newest).")
flags.DEFINE_string("mode", "sample", "sample | consistency | interpolation | sequence | reconstruction | fid")
flags.DEFINE_integer("steps", 50, "Number of sampling steps S.")
flags.DEFINE_string("eta", "0", "eta (0 = DDIM, 1 = DDPM), or 'sigma_hat' for the larger DDPM variance.")
flags.DEFINE_string("spacing", "uniform", "Timestep spacing: uniform | quadratic | leading | trailing | linspace.")
flags.DEFINE_integer("num_samples", None, "Number of samples N (default: 64; 50,000 in fid mode).")
flags.DEFINE_integer("batch_size", 64, "Global batch size (a multiple of the device count).")
flags.DEFINE_integer("seed", 0, "Seed of the latents x_T.")
flags.DEFINE_string("output", None, "Output directory.")
flags.DEFINE_bool("overwrite", False, "Replace existing outputs.")
flags.DEFINE_list("steps_list", ["10", "20", "50", "100", "1000"], "S values for consistency / reconstruction.")
flags.DEFINE_list("fid_steps", ["10", "20", "50", "100"], "S values of the FID table.")
flags.DEFINE_list("fid_etas", ["0.0", "0.2", "0.5", "1.0", "sigma_hat"], "eta values of the FID table.")
flags.DEFINE_string("fid_stats", None, "Reference statistics .npz (default: computed from the training data and cached).")
flags.DEFINE_string("inception_weights", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (local path).")
flags.DEFINE_string("features", None, "Feature extractor for fid: inception | digits (default: digits for the "
                    "digits dataset, else inception).")
flags.DEFINE_string("data_dir", None, "tfds data_dir for reference statistics and reconstruction data.")
FLAGS = flags.FLAGS


def _outputs(out_dir, names):
    paths = [os.path.join(out_dir, n) for n in names]
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not FLAGS.overwrite:
        raise FileExistsError(f"{existing[0]} exists (and {len(existing) - 1} more); pass --overwrite or choose "
                              "another --output")
    os.makedirs(out_dir, exist_ok=True)
    return paths


def _int_list(name, values):
    try:
        return [int(v) for v in values]
    except ValueError:
        raise ValueError(f"--{name} must be integers; got {','.join(values)}") from None


def _dataset_images(model, split, num):
    """uint8 images of the model's training dataset (``split``), at most ``num``."""
    from ddim_jax import data as data_lib

    d = dict(model.data)
    if not d:
        raise ValueError("this mode needs the training data, which a converted checkpoint does not name; "
                         "use --workdir")
    if d["dataset"] == "digits":
        return data_lib.load_digits(split)[0][:num]
    if FLAGS.data_dir:
        d["data_dir"] = FLAGS.data_dir
    import ml_collections

    d["split"] = split
    src = data_lib.make_source(ml_collections.ConfigDict(d))
    return src.get(range(min(num, len(src))))


def run():
    import jax

    from ddim_jax import experiments as ex
    from ddim_jax.schedules import SPACINGS

    if FLAGS.mode not in ex.MODES:
        raise ValueError(f"--mode must be one of {', '.join(ex.MODES)}; got {FLAGS.mode!r}")
    if FLAGS.spacing not in SPACINGS:
        raise ValueError(f"--spacing must be one of {', '.join(SPACINGS)}; got {FLAGS.spacing!r}")
    n = FLAGS.num_samples if FLAGS.num_samples is not None else (50_000 if FLAGS.mode == "fid" else 64)
    if n <= 0:
        raise ValueError(f"--num_samples must be >= 1; got {n}")
    eta, sigma_hat = ex.parse_eta(FLAGS.eta)
    model = ex.load_model(FLAGS.workdir, FLAGS.checkpoint, step=FLAGS.step)
    T = model.schedule.num_timesteps
    checked = {"steps": [FLAGS.steps]}
    if FLAGS.mode in ("consistency", "reconstruction"):
        checked["steps_list"] = _int_list("steps_list", FLAGS.steps_list)
    if FLAGS.mode == "fid":
        checked["fid_steps"] = _int_list("fid_steps", FLAGS.fid_steps)
    for name, values in checked.items():
        bad = [s for s in values if not 1 <= s <= T]
        if bad:
            raise ValueError(f"--{name} must be in [1, {T}] (the model's T); got {bad[0]}")
    out = FLAGS.output or os.path.join(FLAGS.workdir or FLAGS.checkpoint, FLAGS.mode)
    scale = max(1, 64 // model.image_size)
    print(f"model: {model.source}; {jax.device_count()} {jax.devices()[0].platform} device(s), "
          f"{jax.process_count()} process(es)", flush=True)
    is_main = jax.process_index() == 0

    if FLAGS.mode == "sample":
        grid_path, npz_path = _outputs(out, ["samples.png", "samples.npz"])
        imgs = ex.generate(model, n, FLAGS.batch_size, FLAGS.steps, eta=eta, sigma_hat=sigma_hat,
                           spacing=FLAGS.spacing, seed=FLAGS.seed)
        if is_main:
            import numpy as np

            np.savez_compressed(npz_path, images=imgs)
            ex.save_grid(imgs[:100], grid_path, scale=scale)
            print(f"wrote {len(imgs)} samples to {npz_path} and a grid to {grid_path}")
    elif FLAGS.mode == "consistency":
        steps = _int_list("steps_list", FLAGS.steps_list)
        (grid_path,) = _outputs(out, ["consistency.png"])
        rows = ex.consistency(model, min(n, 8), steps, seed=FLAGS.seed, spacing=FLAGS.spacing)
        if is_main:
            ex.save_grid(rows.reshape((-1,) + rows.shape[2:]), grid_path, ncol=rows.shape[1], scale=scale)
            print(f"rows: S = {', '.join(map(str, steps))}; wrote {grid_path}")
    elif FLAGS.mode == "interpolation":
        (grid_path,) = _outputs(out, ["interpolation.png"])
        grid = ex.interpolation(model, max(1, min(n, 16) // 2), 11, FLAGS.steps, seed=FLAGS.seed,
                                spacing=FLAGS.spacing)
        if is_main:
            ex.save_grid(grid.reshape((-1,) + grid.shape[2:]), grid_path, ncol=grid.shape[1], scale=scale)
            print(f"wrote {grid_path}")
    elif FLAGS.mode == "sequence":
        (grid_path,) = _outputs(out, ["sequence.png"])
        grid = ex.sequence(model, min(n, 8), FLAGS.steps, seed=FLAGS.seed, spacing=FLAGS.spacing)
        if is_main:
            ex.save_grid(grid.reshape((-1,) + grid.shape[2:]), grid_path, ncol=grid.shape[1], scale=scale)
            print(f"rows: samples; columns: predicted x0 along {FLAGS.steps} steps, then the sample; wrote {grid_path}")
    elif FLAGS.mode == "reconstruction":
        steps = _int_list("steps_list", FLAGS.steps_list)
        json_path, grid_path = _outputs(out, ["reconstruction.json", "reconstruction.png"])
        images = _dataset_images(model, "test", n)
        errors, recons = ex.reconstruction(model, images, steps, FLAGS.batch_size, spacing=FLAGS.spacing)
        if is_main:
            import numpy as np

            k = min(len(images), 10)
            ex.save_grid(np.concatenate([images[:k]] + [recons[s][:k] for s in steps]), grid_path, ncol=k,
                         scale=scale)
            ex.write_json(json_path, {"num_images": len(images), "spacing": FLAGS.spacing,
                                      "mse_per_dim_0_1": {str(s): e for s, e in errors.items()}})
            print("| S | " + " | ".join(map(str, steps)) + " |")
            print("|---" * (len(steps) + 1) + "|")
            print("| MSE | " + " | ".join(f"{errors[s]:.2e}" for s in steps) + " |")
            print(f"wrote {json_path} and {grid_path} (first row: originals; then one row per S)")
    else:  # fid
        from ddim_jax import fid as fid_lib

        json_path, md_path, plot_path = _outputs(out, ["fid.json", "fid.md", "fid.png"])
        digits = model.data.get("dataset") == "digits"
        feat_name = FLAGS.features or ("digits" if digits else "inception")
        extractor = (fid_lib.feature_extractor("inception", weights=FLAGS.inception_weights)
                     if feat_name == "inception" else fid_lib.feature_extractor(feat_name))
        if FLAGS.fid_stats:
            mu, sigma, _ = fid_lib.load_stats(FLAGS.fid_stats)
        else:
            name = model.data.get("dataset", "dataset") if model.data else None
            if name is None:
                raise ValueError("--fid_stats is required with --checkpoint (the reference data is not known)")
            mu, sigma = fid_lib.reference_stats(name + ("-train" if digits else ""),
                                                lambda: _dataset_images(model, "train", 10**9), extractor)
        rows = ex.fid_table(model, extractor, (mu, sigma), n, FLAGS.batch_size,
                            _int_list("fid_steps", FLAGS.fid_steps), FLAGS.fid_etas, spacing=FLAGS.spacing,
                            seed=FLAGS.seed)
        if is_main:
            table = ex.format_fid_table(rows)
            ex.write_json(json_path, {"features": extractor.name, "spacing": FLAGS.spacing, "rows": rows})
            with open(md_path, "w") as f:
                f.write(f"FID ({extractor.name} features, {n} samples, {FLAGS.spacing} spacing)\n\n{table}\n")
            ex.plot_fid(rows, plot_path)
            print(table)
            print(f"wrote {json_path}, {md_path}, {plot_path}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
    try:
        run()
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
