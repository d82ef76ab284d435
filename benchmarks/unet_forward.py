"""UNet forward-pass benchmark: ddim_jax (jitted Flax) against diffusers' UNet2DModel (PyTorch), same run.

Both run the same network with the same weights (diffusers' random init, converted with
``ddim_jax.convert.convert_diffusers``) on the same inputs; the outputs are compared as a sanity check.
FLOPs come from XLA's cost analysis of the compiled forward (``jitted.lower(...).compile().cost_analysis()``),
cross-checked with ``torch.utils.flop_counter`` on the torch model. Achieved GFLOP/s = XLA FLOPs / time.

    python benchmarks/unet_forward.py [--preset cifar10] [--batch 16] [--iters 10] [--threads N]

``--smoke``: the ``tiny`` preset at 16x16, batch 2, one timed round, to test this script quickly.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


DIFFUSERS_CONFIGS = {
    "cifar10": dict(sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    "celeba64": dict(sample_size=64, block_out_channels=(128, 256, 256, 256, 512), layers_per_block=2,
                     down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    # ddim_jax.unet.PRESETS["tiny"] at 16x16.
    "tiny": dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D")),
}
DDPM_DIFFUSERS_COMMON = dict(in_channels=3, out_channels=3, attention_head_dim=None, downsample_padding=0,
                             flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32, act_fn="silu")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cifar10", choices=sorted(DIFFUSERS_CONFIGS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch.set_num_threads; XLA's CPU backend uses one thread per core by default")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="JAX compute dtype")
    parser.add_argument("--no-torch", action="store_true", help="skip the diffusers/torch side")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="the tiny preset, batch 2, one round: a quick test")
    args = parser.parse_args(argv)
    if args.smoke:
        args.preset, args.batch, args.iters, args.warmup = "tiny", 2, 1, 0
    return args


def main(argv=None) -> None:
    args = parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from ddim_jax.convert import convert_diffusers
    from ddim_jax.unet import PRESETS, UNet, count_params, param_shapes

    size = DIFFUSERS_CONFIGS[args.preset]["sample_size"]
    rng = np.random.default_rng(0)
    x_nchw = rng.standard_normal((args.batch, 3, size, size)).astype(np.float32)
    t = rng.integers(0, 1000, size=(args.batch,)).astype(np.int32)
    res = {"preset": args.preset, "batch": args.batch, "image_size": size, "iters": args.iters,
           "cpu_count": os.cpu_count(), "torch_threads": args.threads, "jax": jax.__version__,
           "jax_backend": jax.default_backend(), "jax_device": str(jax.devices()[0]), "jax_dtype": args.dtype,
           "machine": platform.processor() or platform.machine()}

    torch_model = None
    if not args.no_torch:
        import diffusers
        import torch

        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        torch_model = diffusers.UNet2DModel(**{**DDPM_DIFFUSERS_COMMON, **DIFFUSERS_CONFIGS[args.preset]}).eval()
        spec, params = convert_diffusers(torch_model.state_dict(), dict(torch_model.config))
        kwargs = {**spec.arch, "out_ch": spec.channels, "num_classes": spec.num_classes}
        res.update(torch=torch.__version__, diffusers=diffusers.__version__)
    else:
        kwargs = {**PRESETS[args.preset], "dropout": 0.0}
        params = jax.tree_util.tree_map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape), jnp.float32),
                                        param_shapes(UNet(**kwargs), size))
    model = UNet(**{**kwargs, "dtype": jnp.dtype(args.dtype)})
    res["params"] = count_params(params)

    x = jnp.asarray(x_nchw.transpose(0, 2, 3, 1))
    tj = jnp.asarray(t)
    fwd = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))
    t0 = time.perf_counter()
    lowered = fwd.lower(params, x, tj)
    compiled = lowered.compile()
    res["jax_compile_s"] = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost["flops"])
    res["xla_gflops_per_forward"] = flops / 1e9
    res["xla_gflops_per_image"] = flops / 1e9 / args.batch
    out = compiled(params, x, tj).block_until_ready()
    runners = {"jax": lambda: compiled(params, x, tj).block_until_ready()}

    if torch_model is not None:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        xt, tt = torch.as_tensor(x_nchw), torch.as_tensor(t).long()
        with torch.inference_mode():
            ref = torch_model(xt, tt).sample.numpy()
            counter = FlopCounterMode(display=False)
            with counter:
                torch_model(xt, tt)
        res["torch_flop_counter_gflops_per_forward"] = counter.get_total_flops() / 1e9

        def torch_forward():
            with torch.inference_mode():
                torch_model(xt, tt)

        runners["torch"] = torch_forward

    # Interleaved rounds, so background load on the machine hits both sides alike.
    res["loadavg_1min_before"] = os.getloadavg()[0]
    times = {name: [] for name in runners}
    for i in range(args.warmup + args.iters):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    res["loadavg_1min_after"] = os.getloadavg()[0]
    res["jax_ms_median"] = 1e3 * statistics.median(times["jax"])
    res["jax_ms_min"] = 1e3 * min(times["jax"])
    res["jax_gflop_s"] = flops / 1e9 / statistics.median(times["jax"])
    res["jax_gflop_s_best"] = flops / 1e9 / min(times["jax"])

    if torch_model is not None:
        times = times["torch"]
        res["torch_ms_median"] = 1e3 * statistics.median(times)
        res["torch_ms_min"] = 1e3 * min(times)
        res["torch_gflop_s"] = flops / 1e9 / statistics.median(times)
        res["torch_gflop_s_best"] = flops / 1e9 / min(times)
        res["speedup_jax_over_torch"] = res["torch_ms_median"] / res["jax_ms_median"]
        res["max_abs_diff_vs_torch"] = float(np.abs(np.asarray(out, np.float32).transpose(0, 3, 1, 2) - ref).max())

    print(json.dumps(res, indent=2))
    print()
    print(f"load average (1 min) {res['loadavg_1min_before']:.2f} before, {res['loadavg_1min_after']:.2f} after; "
          f"{os.cpu_count()} cores")
    print("| implementation | median ms / forward | min ms | GFLOPs / forward (XLA) | GFLOP/s at median | "
          "GFLOP/s at min |")
    print("|---|---|---|---|---|---|")
    print(f"| ddim_jax UNet (jit, {args.dtype}) | {res['jax_ms_median']:.1f} | {res['jax_ms_min']:.1f} | "
          f"{res['xla_gflops_per_forward']:.1f} | {res['jax_gflop_s']:.1f} | {res['jax_gflop_s_best']:.1f} |")
    if torch_model is not None:
        print(f"| diffusers UNet2DModel (torch, {args.threads} threads) | {res['torch_ms_median']:.1f} | "
              f"{res['torch_ms_min']:.1f} | {res['xla_gflops_per_forward']:.1f} | {res['torch_gflop_s']:.1f} | "
              f"{res['torch_gflop_s_best']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
