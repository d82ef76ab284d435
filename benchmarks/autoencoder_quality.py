"""Quality of a trained autoencoder (`python train.py --config=configs/autoencoder_digits.py`): does it
keep the digits?

Encodes the 297 held-out digits (upscaled as in training) to the posterior mean, decodes, and reports:
  * the reconstruction error: mean absolute error in grey levels (0..255) and PSNR;
  * whether the digit survives: a logistic-regression classifier fitted on the 1,500 training digits'
    8x8 pixels (scikit-learn, independent of this project's code) reads the held-out originals and their
    reconstructions box-filtered back to 8x8; the accuracies should match;
  * the compression: latent shape and values per image against the image's pixels;
  * a grid: originals (top rows) over reconstructions.

    python benchmarks/autoencoder_quality.py --workdir=runs/autoencoder_digits [--out benchmarks/results]

``--smoke`` reads a random autoencoder of configs/autoencoder_digits.py (with 8 channels per level) and writes
its grid into a temporary directory: a quick test of this script.
"""

import argparse
import os

import jax
import numpy as np
from _machine import random_model, scratch_dir, tiny_autoencoder


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/autoencoder_digits")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--smoke", action="store_true", help="a random autoencoder, output in a temporary directory")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        args.workdir, args.out = random_model("autoencoder_digits", tiny_autoencoder), scratch_dir()

    from sklearn.linear_model import LogisticRegression

    from ddim_jax.data import load_digits, prepare_image
    from ddim_jax.images import save_grid
    from ddim_jax.loading import load

    spec, params = load(args.workdir)
    net, size = spec.build(), spec.image_size
    test_x, test_y = load_digits("test")
    train_x, train_y = load_digits("train")
    x = np.stack([prepare_image(im, size, "none") for im in test_x])

    @jax.jit
    def reconstruct(p, x):
        mean, _ = net.apply({"params": p}, x, method="encode")
        return net.apply({"params": p}, mean, method="decode"), mean

    rec, latents = reconstruct(params, x.astype(np.float32) / 127.5 - 1.0)
    rec = np.clip(np.round((np.asarray(rec) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    err = np.abs(rec.astype(np.float64) - x.astype(np.float64))
    psnr = 10 * np.log10(255.0 ** 2 / np.mean(err ** 2))
    f = size // 8

    def to8(a):
        return a.astype(np.float32).reshape(len(a), 8, f, 8, f, -1).mean(axis=(2, 4))

    flat = lambda a: a.reshape(len(a), -1) / 255.0  # noqa: E731
    clf = LogisticRegression(max_iter=5000, C=0.5).fit(flat(train_x.astype(np.float32)), train_y)
    acc_orig = float(np.mean(clf.predict(flat(to8(x))) == test_y))
    acc_rec = float(np.mean(clf.predict(flat(to8(rec))) == test_y))
    shape = tuple(latents.shape[1:])
    print(f"autoencoder {args.workdir} (step {spec.info.get('step')}): {size}x{size}x{spec.channels} -> latents "
          f"{'x'.join(map(str, shape))} ({int(np.prod(shape))} values per image, "
          f"{size * size * spec.channels / np.prod(shape):.1f}x fewer than pixels)")
    print(f"held-out digits (297): MAE {err.mean():.2f} grey levels, PSNR {psnr:.2f} dB; "
          f"classifier accuracy originals {acc_orig:.3f}, reconstructions {acc_rec:.3f}")
    os.makedirs(args.out, exist_ok=True)
    grid = os.path.join(args.out, "autoencoder_digits_reconstructions.png")
    save_grid(np.concatenate([x[:32], rec[:32]]), grid, scale=2)
    print(f"grid: {grid} (originals above reconstructions)")


if __name__ == "__main__":
    main()
