"""Sampling throughput: ddim_jax's DDIM sampler against diffusers' DDIMPipeline (PyTorch), same run.

Both sample a batch of ``--batch`` 32x32 images with the paper's CIFAR-10 UNet (35,746,307 parameters,
random weights) by DDIM with S = ``--steps`` (eta 0, uniform/"leading" timesteps, x0 clipped to [-1, 1]
with eps re-derived from the clipped x0, as the paper's code and ``sample.py`` do).

- Ours: ``ddim_jax.ddim_sample(make_eps_fn(UNet(**PRESETS['cifar10']), params), ...)``, one jitted
  ``lax.scan`` of S UNet calls; params are Gaussian over ``ddim_jax.unet.param_shapes`` (fan-in scaled
  kernels). The first call of each S (compilation included) is reported on its own.
- Peer: ``diffusers.DDIMPipeline(UNet2DModel(<google/ddpm-cifar10-32's architecture>), DDIMScheduler(linear
  betas 1e-4 .. 0.02, clip_sample=True))`` called with ``num_inference_steps=S, eta=0,
  use_clipped_model_output=True, output_type='np'``, torch with ``--threads`` threads. A forward hook counts
  the UNet calls: exactly S per call, each at batch ``--batch``.

Check: the torch weights converted with ``ddim_jax.convert.convert_diffusers`` and the pipeline's own x_T
(the same seeded generator) give ours the same images as the pipeline (max abs difference printed), at the
smallest S; this reuses the compiled sampler (params are arguments of the program).

Achieved GFLOP/s = S x (XLA's cost-analysis FLOPs of one UNet forward at this batch) / wall time. The
machine's fp32 peak is measured here: a jitted ``--matmul-size`` square float32 matmul, best of
``--matmul-repeats`` (torch's matmul GFLOP/s is reported too). The UNet forward alone is also timed on both
sides, to separate the network from the sampler around it.

Timing: interleaved rounds (ours, then torch) per S, medians and minimums; ``--repeats`` gives the number
of timed rounds for each S (few for S = 50: one round is ~50 UNet forwards per side).

    python benchmarks/sampling_throughput.py [--batch 16] [--steps 10,50] [--repeats 4,2] [--threads N] [--json PATH]
        [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time

from _machine import git_revision, interleaved, machine_description  # benchmarks/_machine.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout

# google/ddpm-cifar10-32's UNet2DModel config (as tests/test_convert.py's CIFAR10_DIFFUSERS).
CIFAR10_DIFFUSERS = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32,
    act_fn="silu", center_input_sample=False, mid_block_scale_factor=1, time_embedding_type="positional",
)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=_ints, default=[10, 50], help="comma-separated S values")
    parser.add_argument("--repeats", type=_ints, default=[4, 2], help="timed rounds per S (comma-separated)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch.set_num_threads; XLA's CPU backend uses one thread per usable core")
    parser.add_argument("--forward-repeats", type=int, default=3, help="rounds timing the UNet forward alone")
    parser.add_argument("--matmul-size", type=int, default=4096)
    parser.add_argument("--matmul-repeats", type=int, default=5)
    parser.add_argument("--no-check", action="store_true", help="skip the output comparison")
    parser.add_argument("--smoke", action="store_true",
                        help="a one-level UNet at 8x8, batch 2, S = 2, one round: to test this script quickly")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.steps, args.repeats, args.forward_repeats = 2, [2], [1], 1
        args.matmul_size, args.matmul_repeats = 64, 1
    if len(args.repeats) == 1:
        args.repeats = args.repeats * len(args.steps)
    if len(args.repeats) != len(args.steps):
        parser.error("--repeats needs one value, or one per --steps value")
    return args


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)

    import diffusers
    import flax
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    import ddim_jax
    from ddim_jax.convert import convert_diffusers
    from ddim_jax.unet import PRESETS, UNet, count_params, make_eps_fn, param_shapes

    torch.set_num_threads(args.threads)
    B = args.batch
    kwargs = dict(PRESETS["cifar10"])
    dcfg = dict(CIFAR10_DIFFUSERS)
    if args.smoke:
        kwargs.update(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,), norm_groups=8)
        dcfg.update(sample_size=8, block_out_channels=(32,), layers_per_block=1, norm_num_groups=8,
                    down_block_types=("AttnDownBlock2D",), up_block_types=("AttnUpBlock2D",))
    size = dcfg["sample_size"]
    res = {"command": "python " + shlex.join(["benchmarks/sampling_throughput.py"] + argv),
           "git": git_revision(), "machine": machine_description(), "jax": jax.__version__, "flax": flax.__version__,
           "jax_backend": jax.default_backend(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "torch_threads": args.threads, "batch": B, "image_size": size, "steps": args.steps,
           "repeats": args.repeats, "loadavg_1min_start": os.getloadavg()[0]}
    print(f"load average (1 min) at start: {res['loadavg_1min_start']:.2f}", flush=True)

    # ---- the machine's fp32 matmul rate, XLA and torch, interleaved; best of the repeats.
    n = args.matmul_size
    rng = np.random.default_rng(0)
    a_np, b_np = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    a_j, b_j = jnp.asarray(a_np), jnp.asarray(b_np)
    a_t, b_t = torch.from_numpy(a_np), torch.from_numpy(b_np)
    matmul = jax.jit(jnp.matmul).lower(a_j, b_j).compile()
    mm = {"jax": lambda: matmul(a_j, b_j).block_until_ready(), "torch": lambda: torch.mm(a_t, b_t)}
    for fn in mm.values():
        fn()
    mm_times = interleaved(mm, args.matmul_repeats)
    mm_flops = 2.0 * n ** 3
    res["matmul_size"] = n
    for k in mm:
        res[f"matmul_{k}_gflop_s_best"] = mm_flops / 1e9 / min(mm_times[k])
        res[f"matmul_{k}_gflop_s_median"] = mm_flops / 1e9 / statistics.median(mm_times[k])
    peak = res["matmul_jax_gflop_s_best"]
    print(f"matmul {n}^3 fp32: XLA best {peak:.1f} GFLOP/s, torch best {res['matmul_torch_gflop_s_best']:.1f} GFLOP/s",
          flush=True)
    del a_j, b_j, a_t, b_t, a_np, b_np

    # ---- models: ours with random params over param_shapes; torch's DDIMPipeline with random weights.
    model = UNet(**kwargs)
    prng = np.random.default_rng(1)

    def _rand_leaf(path, s):  # float32 numpy arrays: no conversion program to compile per shape
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):  # GroupNorm scales around 1, biases small, kernels fan-in scaled
            return (1.0 + 0.02 * prng.standard_normal(s.shape)).astype(np.float32)
        if len(s.shape) == 1:
            return (0.02 * prng.standard_normal(s.shape)).astype(np.float32)
        return (prng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)

    params = jax.device_put(jax.tree_util.tree_map_with_path(_rand_leaf, param_shapes(model, size)))
    res["params"] = count_params(params)
    eps_fn = make_eps_fn(model, params)
    schedule = ddim_jax.make_schedule("linear", 1000)

    torch.manual_seed(0)
    tunet = diffusers.UNet2DModel(**dcfg).eval()
    res["torch_params"] = sum(p.numel() for p in tunet.parameters())
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                        beta_schedule="linear", clip_sample=True, clip_sample_range=1.0,
                                        set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    pipe = diffusers.DDIMPipeline(unet=tunet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    unet_calls = []
    tunet.register_forward_hook(lambda mod, inp, out: unet_calls.append(int(inp[0].shape[0])))
    seed = 1234

    def torch_sample(S):
        unet_calls.clear()
        out = pipe(batch_size=B, generator=torch.Generator().manual_seed(seed), eta=0.0, num_inference_steps=S,
                   use_clipped_model_output=True, output_type="np").images
        if unet_calls != [B] * S:
            raise AssertionError(f"DDIMPipeline made {len(unet_calls)} UNet calls at batches {set(unet_calls)}; "
                                 f"expected {S} at batch {B}")
        return out

    # The pipeline's x_T (randn_tensor on CPU is torch.randn with the generator), NHWC for us.
    x_T_nchw = torch.randn((B, 3, size, size), generator=torch.Generator().manual_seed(seed))
    x_T = jnp.asarray(x_T_nchw.numpy().transpose(0, 2, 3, 1))

    def jax_sample(S, eps=eps_fn):
        return ddim_sample_blocking(eps, S)

    def ddim_sample_blocking(eps, S):
        return ddim_jax.ddim_sample(eps, schedule, x_T, S, clip_x0=1.0).block_until_ready()

    # ---- one UNet forward: XLA's FLOPs, and the forward alone on both sides (it also warms torch up).
    t_fwd = jnp.full((B,), 500, jnp.int32)
    fwd = jax.jit(lambda e, x, t: e(x, t)).lower(eps_fn, x_T, t_fwd).compile()
    cost = fwd.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops_fwd = float(cost["flops"])
    res["xla_gflops_per_forward"] = flops_fwd / 1e9
    tt = torch.full((B,), 500, dtype=torch.long)

    def torch_fwd():
        with torch.no_grad():  # what DDIMPipeline uses
            tunet(x_T_nchw, tt)

    fwd_runs = {"jax": lambda: fwd(eps_fn, x_T, t_fwd).block_until_ready(), "torch": torch_fwd}
    for fn in fwd_runs.values():
        fn()
    fwd_times = interleaved(fwd_runs, args.forward_repeats)
    for k in fwd_runs:
        res[f"forward_{k}_s_all"] = fwd_times[k]
        res[f"forward_{k}_s_median"] = statistics.median(fwd_times[k])
        res[f"forward_{k}_s_min"] = min(fwd_times[k])
    print(f"UNet forward at batch {B} ({flops_fwd / 1e9:.1f} GFLOPs XLA): ours {res['forward_jax_s_median']:.3f} s "
          f"median / {res['forward_jax_s_min']:.3f} min, torch {res['forward_torch_s_median']:.3f} / "
          f"{res['forward_torch_s_min']:.3f} s", flush=True)

    # ---- sampling, per S: ours' first call (compilation included), then interleaved timed rounds.
    res["per_S"] = {}
    for S, reps in zip(args.steps, args.repeats):
        tau = ddim_jax.make_timesteps(1000, S, "uniform")
        scheduler.set_timesteps(S)
        assert len(tau) == S and np.array_equal(tau[::-1], scheduler.timesteps.numpy()), (tau, scheduler.timesteps)
        r = {"repeats": reps}
        t0 = time.perf_counter()
        out = jax_sample(S)
        r["jax_first_call_s"] = time.perf_counter() - t0
        r["jax_output_finite"] = bool(np.isfinite(np.asarray(out)).all())
        print(f"S={S}: ours first call (compile + run) {r['jax_first_call_s']:.2f} s", flush=True)
        times = {"jax": [], "torch": []}
        r["loadavg_1min_before"] = os.getloadavg()[0]
        for i in range(reps):
            row = {}
            for k, fn in (("jax", jax_sample), ("torch", torch_sample)):
                t0 = time.perf_counter()
                out = fn(S)
                row[k] = time.perf_counter() - t0
                times[k].append(row[k])
                if k == "torch":
                    torch_out = out
            print(f"S={S} round {i}: " + ", ".join(f"{k} {v:.2f} s" for k, v in row.items()), flush=True)
        r["loadavg_1min_after"] = os.getloadavg()[0]
        for k in times:
            med, best = statistics.median(times[k]), min(times[k])
            r[f"{k}_s_all"] = times[k]
            r[f"{k}_s_median"], r[f"{k}_s_min"] = med, best
            r[f"{k}_images_per_s_median"], r[f"{k}_images_per_s_best"] = B / med, B / best
            r[f"{k}_gflop_s_median"] = S * flops_fwd / 1e9 / med
            r[f"{k}_gflop_s_best"] = S * flops_fwd / 1e9 / best
            r[f"{k}_pct_of_peak_median"] = 100 * r[f"{k}_gflop_s_median"] / peak
            r[f"{k}_pct_of_peak_best"] = 100 * r[f"{k}_gflop_s_best"] / peak
            r[f"{k}_s_per_unet_call_median"] = med / S
        r["ratio_ours_over_torch_median"] = r["torch_s_median"] / r["jax_s_median"]
        r["ratio_ours_over_torch_best"] = r["torch_s_min"] / r["jax_s_min"]
        if not args.no_check and S == min(args.steps):
            cspec, cparams = convert_diffusers(tunet.state_dict(), dict(tunet.config))
            kw = {**cspec.arch, "out_ch": cspec.channels}
            assert all(kw[k] == kwargs[k] for k in ("ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions"))
            ours = np.asarray(jax_sample(S, make_eps_fn(model, cparams)))  # same compiled sampler
            ours = np.clip(ours / 2 + 0.5, 0.0, 1.0)
            r["check_max_abs_diff_vs_pipeline"] = float(np.abs(ours - torch_out).max())
            r["check_mean_abs_diff_vs_pipeline"] = float(np.abs(ours - torch_out).mean())
            print(f"S={S} check: ours with the converted torch weights vs DDIMPipeline, images in [0, 1]: max abs diff "
                  f"{r['check_max_abs_diff_vs_pipeline']:.2e}, mean {r['check_mean_abs_diff_vs_pipeline']:.2e}",
                  flush=True)
        res["per_S"][str(S)] = r

    res["loadavg_1min_end"] = os.getloadavg()[0]
    print(json.dumps(res, indent=2))
    print()
    m = res["machine"]
    print(f"Machine: {m.get('Model name', platform.processor())}, {m['cpus_usable']} usable cores "
          f"({m.get('Thread(s) per core', '?')} thread(s) per core), {platform.platform()}; jax {jax.__version__} "
          f"({jax.default_backend()}), flax {flax.__version__}, torch {torch.__version__} ({args.threads} threads), "
          f"diffusers {diffusers.__version__}")
    print(f"Command: `{res['command']}` (checkout {res['git']})")
    print(f"Load average (1 min): {res['loadavg_1min_start']:.2f} at start, {res['loadavg_1min_end']:.2f} at end")
    print(f"fp32 matmul {n}x{n}: XLA {res['matmul_jax_gflop_s_best']:.1f} GFLOP/s best "
          f"({res['matmul_jax_gflop_s_median']:.1f} median), torch {res['matmul_torch_gflop_s_best']:.1f} best "
          f"({res['matmul_torch_gflop_s_median']:.1f} median); peak used below = XLA best")
    print(f"UNet forward alone, batch {B}: ours {res['forward_jax_s_median']:.3f} s median / "
          f"{res['forward_jax_s_min']:.3f} s min, torch {res['forward_torch_s_median']:.3f} / "
          f"{res['forward_torch_s_min']:.3f} s; {flops_fwd / 1e9:.1f} GFLOPs (XLA)")
    print()
    print(f"| S | implementation (batch {B}) | timed rounds | median s | min s | images/s (median) | images/s (best) | "
          f"GFLOP/s (median) | % of peak (median) | % of peak (best) | ours first call s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for S in args.steps:
        r = res["per_S"][str(S)]
        for k, label in (("jax", "ddim_jax ddim_sample (jit scan)"), ("torch", "diffusers DDIMPipeline")):
            first = f"{r['jax_first_call_s']:.1f}" if k == "jax" else "-"
            print(f"| {S} | {label} | {r['repeats']} | {r[f'{k}_s_median']:.2f} | {r[f'{k}_s_min']:.2f} | "
                  f"{r[f'{k}_images_per_s_median']:.2f} | {r[f'{k}_images_per_s_best']:.2f} | "
                  f"{r[f'{k}_gflop_s_median']:.1f} | {r[f'{k}_pct_of_peak_median']:.0f}% | "
                  f"{r[f'{k}_pct_of_peak_best']:.0f}% | {first} |")
    print()
    for S in args.steps:
        r = res["per_S"][str(S)]
        print(f"S={S}: ours / diffusers (images/s) {r['ratio_ours_over_torch_median']:.2f}x at the medians, "
              f"{r['ratio_ours_over_torch_best']:.2f}x at the minima (goal >= 1.1x: "
              f"{'met' if r['ratio_ours_over_torch_median'] >= 1.1 else 'NOT met'}); ours at "
              f"{r['jax_pct_of_peak_median']:.0f}% of the measured peak (goal >= 85%: "
              f"{'met' if r['jax_pct_of_peak_median'] >= 85 else 'NOT met'})"
              + (f"; check max abs diff {r['check_max_abs_diff_vs_pipeline']:.1e}"
                 if "check_max_abs_diff_vs_pipeline" in r else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
