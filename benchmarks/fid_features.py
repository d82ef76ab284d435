"""FID Inception feature extraction: throughput of ours (jitted Flax) against pytorch-fid's InceptionV3.

Both networks get the same random weights (the FID Inception's shapes; no weights file needed; the
throughput does not depend on the values) and the same uint8 32x32 images (CIFAR-10 size; both resize
to 299x299 inside). Ours goes through ``FeatureExtractor.extract`` (host preprocessing, padding and
the device transfer included); pytorch-fid's model is called on float tensors in [0, 1] under
``torch.no_grad``, as its ``fid_score`` does. Times are medians over --repeats runs after a warm-up
call (ours: the call whose features are compared with pytorch-fid's). The peer is skipped, with a note,
when pytorch-fid cannot be imported. The FLOP count is XLA's cost analysis of our compiled batch.

    python benchmarks/fid_features.py [--images 200] [--batch 50] [--repeats 3] [--smoke]

``--smoke``: one image, one timed repeat: a quick test.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import numpy as np

from ddim_jax import fid, inception


def random_params(seed: int = 0) -> dict:
    """Random Flax params of the FID Inception (folded conv + bias), He-normal, so activations stay O(1)."""
    shapes = inception._abstract_params()
    rng = np.random.default_rng(seed)

    def fill(tree):
        out = {}
        for k, v in tree.items():
            if hasattr(v, "items"):
                out[k] = fill(v)
            elif k == "kernel":
                fan_in = int(np.prod(v.shape[:-1]))
                out[k] = (rng.standard_normal(v.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
            else:
                out[k] = (rng.standard_normal(v.shape) * 0.1).astype(np.float32)
        return out

    return fill(shapes)


def to_torch_state_dict(params: dict):
    """Our folded params as a pytorch-fid (torchvision Inception3) state dict: BN gamma 1, var 1 - eps."""
    import torch

    sd = {}

    def walk(tree, prefix):
        for k, v in tree.items():
            if k == "conv":
                cout = v["bias"].shape[0]
                sd[prefix + ".conv.weight"] = torch.from_numpy(np.transpose(v["kernel"], (3, 2, 0, 1)).copy())
                sd[prefix + ".bn.weight"] = torch.ones(cout)
                sd[prefix + ".bn.bias"] = torch.from_numpy(v["bias"].copy())
                sd[prefix + ".bn.running_mean"] = torch.zeros(cout)
                sd[prefix + ".bn.running_var"] = torch.full((cout,), 1.0 - inception.BN_EPS)
            else:
                walk(v, f"{prefix}.{k}" if prefix else k)

    walk(params, "")
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    return sd


def median_time(fn, repeats, warm_up=True):
    if warm_up:
        fn()  # warm-up (compilation)
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="one image, one repeat: a quick test")
    args = p.parse_args(argv)
    if args.smoke:
        args.images, args.batch, args.repeats = 1, 1, 1
    return args


def main(argv=None):
    args = parse_args(argv)

    params = random_params()
    images = np.random.default_rng(1).integers(0, 256, size=(args.images, 32, 32, 3), dtype=np.uint8)
    ext = fid.inception_feature_extractor(params)
    ours_feats = ext.extract(images, batch_size=args.batch, progress=False)  # also the warm-up (compilation)
    t_ours = median_time(lambda: ext.extract(images, batch_size=args.batch, progress=False), args.repeats,
                         warm_up=False)

    x = jax.numpy.zeros((args.batch, 32, 32, 3), jax.numpy.float32)
    cost = fid._inception_apply.lower(ext.params, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops_per_image = float(cost.get("flops", float("nan"))) / args.batch

    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"{platform.processor() or platform.machine()}")
    print(f"images {args.images} (32x32 -> 299x299), batch {args.batch}, XLA GFLOP/image {flops_per_image / 1e9:.2f}")
    print(f"ours:        {t_ours:.3f} s  {args.images / t_ours:8.1f} img/s  "
          f"{args.images * flops_per_image / t_ours / 1e9:.1f} GFLOP/s")

    try:
        import torch
        import pytorch_fid.inception as pfi
    except Exception as e:  # not installed, or torchvision failing to load beside this torch
        print(f"pytorch-fid: not measured ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
        return
    sd = to_torch_state_dict(params)
    pfi.load_state_dict_from_url = lambda *a, **k: sd  # no download: our random weights
    model = pfi.InceptionV3([3]).eval()
    xt = torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)

    def run_torch():
        with torch.no_grad():
            return torch.cat([model(xt[i:i + args.batch])[0].flatten(1) for i in range(0, args.images, args.batch)])

    err = np.abs(run_torch().numpy() - ours_feats).max()
    t_torch = median_time(run_torch, args.repeats)
    print(f"pytorch-fid: {t_torch:.3f} s  {args.images / t_torch:8.1f} img/s  (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")
    print(f"pytorch-fid / ours time: {t_torch / t_ours:.2f}x; max |feature diff| {err:.2e}")


if __name__ == "__main__":
    main()
