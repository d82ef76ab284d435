"""Quality of the embedded default (`python train.py`): are its samples recognisable digits?

Draws N samples with DDIM (eta = 0, S = 50; --solver, --eta and --steps change that) from a run's EMA
params and reports:
  * a classifier fitted on the digits' training split (scikit-learn logistic regression on pixels,
    independent of this project's code) reading the samples: mean confidence, the share read with
    confidence >= 0.9, and how many samples fall in each class (all ten should be present);
  * FID in the feature space of the digits CNN (ddim_jax.fid.digits_feature_extractor) between the
    samples and the 297 held-out digits, next to the floor: the 1,500 training digits against the same
    held-out digits (same sample sizes, so the same small-sample bias);
  * a grid of the first 100 samples.

    python benchmarks/digits_quality.py --workdir=runs/digits [--num 1500] [--out benchmarks/results]
        [--steps 50] [--solver ddim] [--eta 0]

For a class-conditional run (configs/digits_cond.py) it samples every digit in turn (sample i asks
for digit i mod 10) at each classifier-free guidance scale of --guidance (0 = the unconditional model,
1 = no guidance) and adds the share of samples the digits CNN reads as the requested digit:

    python benchmarks/digits_quality.py --workdir=runs/digits_cond --guidance 0,1,2,3

A latent model of the upscaled digits (configs/latent_digits.py) generates 32x32 images: they are
box-filtered back to 8x8 (the mean of each 4x4 block) before the CNN and the FID read them.

    python benchmarks/digits_quality.py --workdir=runs/latent_digits --guidance 0,1,2,3

``--smoke`` reads random models of configs/digits.py and configs/digits_cond.py in turn (with a one-level
UNet), draws 20 samples
with S = 2 (guidance 2) and writes the grids into a temporary directory: a quick test of this script.
"""

import argparse
import os

import jax
import numpy as np
from _machine import random_model, sampling_batch, scratch_dir, tiny_unet


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/digits")
    p.add_argument("--num", type=int, default=1500)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--solver", default="ddim", help="any of ddim_jax.SOLVERS (on its default spacing)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM's eta (1 = DDPM)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--guidance", default="0,1,2,3", help="guidance scales for a class-conditional run")
    p.add_argument("--smoke", action="store_true",
                   help="random unconditional and conditional models, 20 samples, S = 2: a quick test")
    args = p.parse_args(argv)
    if args.num < 2:
        p.error("--num must be at least 2 (the FID needs the covariance of at least two samples)")
    if args.smoke:
        args.num, args.steps, args.guidance = 20, 2, "2"
    return args


def main(argv=None):
    args = parse_args(argv)
    if not args.smoke:
        return report(args)
    args.out = scratch_dir()
    for config_name in ("digits", "digits_cond"):
        args.workdir = random_model(config_name, tiny_unet)
        report(args)


def report(args):
    from sklearn.linear_model import LogisticRegression

    from ddim_jax import experiments as ex
    from ddim_jax.data import load_digits
    from ddim_jax.images import save_grid
    from ddim_jax.loading import load_model

    model = load_model(args.workdir)
    if model.num_classes is not None:
        return conditional(model, args)
    samples = ex.generate(model, args.num, sampling_batch(model, args.num, 250), args.steps, seed=0,
                          solver=args.solver, eta=args.eta)
    train_x, train_y = load_digits("train")
    test_x, test_y = load_digits("test")
    flat = lambda x: x.reshape(len(x), -1).astype(np.float32) / 255.0  # noqa: E731
    clf = LogisticRegression(max_iter=5000, C=0.5).fit(flat(train_x), train_y)
    held_out_acc = clf.score(flat(test_x), test_y)
    prob = clf.predict_proba(flat(samples))
    conf, label = prob.max(1), prob.argmax(1)
    counts = np.bincount(label, minlength=10)
    real_conf = clf.predict_proba(flat(test_x)).max(1)
    cnn, cnn_acc = cnn_reader()
    cnn_conf, cnn_real_conf = np.asarray(cnn(samples)).max(1), np.asarray(cnn(test_x)).max(1)
    cnn_counts = np.bincount(np.asarray(cnn(samples)).argmax(1), minlength=10)
    score, fid_floor = held_out_fid()
    fid_samples = score(samples)
    fid_noise = score(np.random.default_rng(0).integers(0, 256, train_x.shape, dtype=np.uint8))
    os.makedirs(args.out, exist_ok=True)
    grid = save_grid(samples[:100], os.path.join(args.out, f"digits_samples{suffix(args)}.png"), ncol=10, scale=4)
    save_grid(test_x[:100], os.path.join(args.out, "digits_real.png"), ncol=10, scale=4)  # to show beside it
    print(f"run: {model.source}; {args.num} samples, {sampler(args)}")
    print("| measure | samples | held-out real digits |\n|---|---|---|")
    print(f"| logistic regression (held-out accuracy {held_out_acc:.3f}): mean confidence | {conf.mean():.3f} | "
          f"{real_conf.mean():.3f} |")
    print(f"| logistic regression: share read with confidence >= 0.9 | {np.mean(conf >= 0.9):.3f} | "
          f"{np.mean(real_conf >= 0.9):.3f} |")
    print(f"| digits CNN (held-out accuracy {cnn_acc:.3f}): mean confidence | {cnn_conf.mean():.3f} | "
          f"{cnn_real_conf.mean():.3f} |")
    print(f"| digits CNN: share read with confidence >= 0.9 | {np.mean(cnn_conf >= 0.9):.3f} | "
          f"{np.mean(cnn_real_conf >= 0.9):.3f} |")
    print(f"| samples per class 0..9 (logistic regression) | {' '.join(map(str, counts))} | |")
    print(f"| samples per class 0..9 (digits CNN) | {' '.join(map(str, cnn_counts))} | |")
    print("\n| FID in digits-CNN features | value |\n|---|---|")
    print(f"| samples vs held-out | {fid_samples:.2f} |")
    print(f"| training digits vs held-out (the floor) | {fid_floor:.2f} |")
    print(f"| uniform noise vs held-out | {fid_noise:.2f} |")
    print(f"grid: {grid}")


def cnn_reader():
    """``(probs, held_out_accuracy)``: ``probs(x)`` is the digits CNN's class probabilities (numpy) of uint8
    digits ``[N, 8, 8, 1]``."""
    from ddim_jax import digits_classifier

    params, accuracy = digits_classifier.load_digits_classifier(verbose=False)
    net = digits_classifier.DigitsCNN()
    apply = jax.jit(lambda p, x: jax.nn.softmax(net.apply({"params": p}, x)))  # one compiled program, not one per op
    return lambda x: np.asarray(apply(params, x.astype(np.float32) / 255.0)), accuracy


def cnn_features():
    """``feats(x)``: the digits CNN's FID features of uint8 digits (ddim_jax.fid.digits_feature_extractor)."""
    from ddim_jax import fid

    ext = fid.digits_feature_extractor()
    return lambda x: ext.extract(x, batch_size=500, progress=False)


def held_out_fid():
    """``(score, floor)``: ``score(samples)`` is the FID in the digits CNN's features between uint8 digits
    (the first 1,500) and the 297 held-out digits, this script's measurement; ``floor`` is the score of the
    1,500 training digits (the same sample sizes, so the same small-sample bias)."""
    from ddim_jax import fid
    from ddim_jax.data import load_digits

    train_x, _ = load_digits("train")
    feats = cnn_features()
    f_test = feats(load_digits("test")[0])

    def score(samples) -> float:
        return float(fid.fid_from_features(feats(samples[:len(train_x)]), f_test))

    return score, score(train_x)


def sampler(args) -> str:
    return f"{args.solver} S = {args.steps}" + (f", eta = {args.eta:g}" if args.solver == "ddim" else "")


def suffix(args) -> str:
    """The grids' file-name suffix: empty for the default sampler (DDIM, eta 0, S 50)."""
    if (args.solver, args.eta, args.steps) == ("ddim", 0.0, 50):
        return ""
    return f"_{args.solver}_S{args.steps}" + (f"_eta{args.eta:g}" if args.solver == "ddim" and args.eta else "")


def conditional(model, args):
    """Requested-class accuracy, confident reads and FID at each guidance scale."""
    from ddim_jax import experiments as ex
    from ddim_jax import fid
    from ddim_jax.data import load_digits
    from ddim_jax.images import save_grid

    train_x, _ = load_digits("train")
    test_x, _ = load_digits("test")
    probs, cnn_acc = cnn_reader()
    feats = cnn_features()
    f_test = feats(test_x)
    asked = np.arange(args.num) % 10
    name = os.path.basename(os.path.normpath(args.workdir))

    print(f"run: {model.source}; {args.num} samples (digit i mod 10 asked for sample i), {sampler(args)}; "
          f"digits CNN held-out accuracy {cnn_acc:.3f}")
    print("| guidance scale | requested digit read (CNN) | read with confidence >= 0.9 | FID (CNN features) |")
    print("|---|---|---|---|")
    os.makedirs(args.out, exist_ok=True)
    for scale in [float(v) for v in args.guidance.split(",")]:
        full = ex.generate(model, args.num, sampling_batch(model, args.num, 250), args.steps, seed=0, labels="all",
                           guidance=scale, solver=args.solver, eta=args.eta)
        samples = fid.box_downsample(full, 8)
        p = probs(samples)
        print(f"| {scale:g} | {np.mean(p.argmax(1) == asked):.3f} | {np.mean(p.max(1) >= 0.9):.3f} | "
              f"{fid.fid_from_features(feats(samples[:len(train_x)]), f_test):.2f} |", flush=True)
        save_grid(full[:100], os.path.join(args.out, f"{name}_samples_g{scale:g}{suffix(args)}.png"),
                  ncol=10, scale=max(1, 32 // full.shape[1]))
    real = probs(test_x)
    print(f"| (held-out real digits) | {np.mean(real.argmax(1) == load_digits('test')[1]):.3f} | "
          f"{np.mean(real.max(1) >= 0.9):.3f} | {fid.fid_from_features(feats(train_x), f_test):.2f} (training "
          "digits: the floor) |")


if __name__ == "__main__":
    main()
