"""Quality of a concat-conditioned super-resolution run (configs/digits_superres.py) on the 297 held-out
digits: each is box-filtered to 4x4, the model draws an 8x8 digit from that view (DDIM, eta = 0, S = 50,
or --steps), and the result is compared with the original and with the bilinear upscaling of the view:

  * MSE per pixel in [0, 1] units and PSNR against the originals;
  * consistency: the MSE between the sample's own 4x4 view and the view it was given;
  * the digits CNN (held-out accuracy printed) reading the true digit;
  * a grid: the 4x4 views (bilinear), the samples, the originals.

    python benchmarks/superres_quality.py --workdir=runs/digits_superres [--steps 50] [--out benchmarks/results]

``--smoke`` reads a random model of configs/digits_superres.py (with a one-level UNet), samples with S = 2 and
writes its grid into a temporary directory: a quick test of this script.
"""

import argparse
import os

import jax
import numpy as np
from _machine import random_model, sampling_batch, scratch_dir, tiny_unet


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/digits_superres")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--smoke", action="store_true", help="a random model, S = 2, output in a temporary directory")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps = 2
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        args.workdir, args.out = random_model("digits_superres", tiny_unet), scratch_dir()

    from ddim_jax import concat, digits_classifier
    from ddim_jax import experiments as ex
    from ddim_jax.data import load_digits
    from ddim_jax.images import from_uint8, save_grid, to_uint8
    from ddim_jax.loading import load_model

    model = load_model(args.workdir)
    if model.spec.concat != "superres2x":
        raise SystemExit(f"{args.workdir} is not a superres2x model (its concat is {model.spec.concat!r})")
    test_x, test_y = load_digits("test")
    cond = concat.get("superres2x")
    view = np.asarray(cond.observe(from_uint8(test_x)))
    bilinear = to_uint8(np.asarray(cond.condition(view, 8)))
    samples = ex.generate(model, len(test_x), sampling_batch(model, len(test_x), 100), args.steps, sources=test_x,
                          seed=0)

    cnn_params, cnn_acc = digits_classifier.load_digits_classifier(verbose=False)
    cnn_model = digits_classifier.DigitsCNN()

    def read(imgs):
        return np.asarray(cnn_model.apply({"params": cnn_params}, imgs.astype(np.float32) / 255.0)).argmax(1)

    def row(name, imgs):
        err = np.mean((imgs.astype(np.float64) / 255 - test_x.astype(np.float64) / 255) ** 2)
        own = np.asarray(cond.observe(from_uint8(imgs)))
        consistency = np.mean(((own - view) / 2) ** 2)
        acc = np.mean(read(imgs) == test_y)
        psnr = f"{10 * np.log10(1 / err):.1f}" if err > 0 else "-"
        print(f"| {name} | {err:.4f} | {psnr} | {consistency:.5f} | {acc:.3f} |")

    print(f"run: {model.source}; {len(test_x)} held-out digits, DDIM S = {args.steps}, eta = 0; digits CNN "
          f"held-out accuracy {cnn_acc:.3f}")
    print("| 8x8 from the 4x4 view | MSE | PSNR (dB) | its 4x4 view vs the given one (MSE) | CNN reads the digit |")
    print("|---|---|---|---|---|")
    row("bilinear upscaling", bilinear)
    row("the model's samples", samples)
    row("(the originals)", test_x)
    os.makedirs(args.out, exist_ok=True)
    name = os.path.basename(os.path.normpath(args.workdir))
    path = os.path.join(args.out, f"{name}_samples.png")
    save_grid(np.concatenate([bilinear[:10], samples[:10], test_x[:10]]), path, ncol=10, scale=4)
    print(f"grid (views, samples, originals): {path}; {jax.device_count()} device(s)")


if __name__ == "__main__":
    main()
