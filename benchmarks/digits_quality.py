"""Quality of the embedded default (`python train.py`): are its samples recognisable digits?

Draws N samples with DDIM (eta = 0, S = 50) from a run's EMA params and reports:
  * a classifier fitted on the digits' training split (scikit-learn logistic regression on pixels,
    independent of this project's code) reading the samples: mean confidence, the share read with
    confidence >= 0.9, and how many samples fall in each class (all ten should be present);
  * FID in the feature space of the digits CNN (ddim_jax.fid.digits_feature_extractor) between the
    samples and the 297 held-out digits, next to the floor: the 1,500 training digits against the same
    held-out digits (same sample sizes, so the same small-sample bias);
  * a grid of the first 100 samples.

    python benchmarks/digits_quality.py --workdir=runs/digits [--num 1500] [--out benchmarks/results]
"""

import argparse
import os

import numpy as np


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/digits")
    p.add_argument("--num", type=int, default=1500)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()

    from sklearn.linear_model import LogisticRegression

    from ddim_jax import experiments as ex
    from ddim_jax import fid
    from ddim_jax.data import load_digits
    from ddim_jax.images import save_grid

    model = ex.load_model(args.workdir)
    samples = ex.generate(model, args.num, 250, args.steps, seed=0)
    train_x, train_y = load_digits("train")
    test_x, test_y = load_digits("test")
    flat = lambda x: x.reshape(len(x), -1).astype(np.float32) / 255.0  # noqa: E731
    clf = LogisticRegression(max_iter=5000, C=0.5).fit(flat(train_x), train_y)
    held_out_acc = clf.score(flat(test_x), test_y)
    prob = clf.predict_proba(flat(samples))
    conf, label = prob.max(1), prob.argmax(1)
    counts = np.bincount(label, minlength=10)
    ext = fid.digits_feature_extractor()
    feats = lambda x: ext.extract(x, batch_size=500, progress=False)  # noqa: E731
    f_test = feats(test_x)
    fid_samples = fid.fid_from_features(feats(samples[:len(train_x)]), f_test)
    fid_floor = fid.fid_from_features(feats(train_x), f_test)
    noise = np.random.default_rng(0).integers(0, 256, train_x.shape, dtype=np.uint8)
    fid_noise = fid.fid_from_features(feats(noise), f_test)
    os.makedirs(args.out, exist_ok=True)
    grid = save_grid(samples[:100], os.path.join(args.out, "digits_samples.png"), ncol=10, scale=4)
    print(f"run: {model.source}; {args.num} samples, DDIM S = {args.steps}, eta = 0")
    print(f"| measure | value |\n|---|---|")
    print(f"| logistic-regression held-out accuracy on real digits | {held_out_acc:.3f} |")
    print(f"| mean classifier confidence on samples | {conf.mean():.3f} |")
    print(f"| samples read with confidence >= 0.9 | {np.mean(conf >= 0.9):.3f} |")
    print(f"| samples per class 0..9 | {' '.join(map(str, counts))} |")
    print(f"| digits-CNN FID: samples vs held-out | {fid_samples:.2f} |")
    print(f"| digits-CNN FID: training digits vs held-out (floor) | {fid_floor:.2f} |")
    print(f"| digits-CNN FID: uniform noise vs held-out | {fid_noise:.2f} |")
    print(f"grid: {grid}")


if __name__ == "__main__":
    main()
