"""One Stable Diffusion 1.5 sampling step and its prompt encoding: ddim_jax (jitted) beside diffusers' and
transformers' torch models of the same configurations, timed in the same run.

    python benchmarks/sd_unet_step.py [--batches 1,2] [--iters 5] [--warmup 1] [--threads N] [--sequential]
                                      [--torch-device cpu|cuda] [--json FILE]

* UNet step: ``cond_unet.SD15`` (SD 1.x's UNet, 859,520,964 parameters) on 64x64x4 latents (512x512 images)
  with a 77x768 context, guided (classifier-free guidance, scale 7.5): one network call on ``[x; x]`` under
  ``[context; null context]`` (2B rows for B images) and the combination, as diffusers' StableDiffusionPipeline
  does. Ours: the pipelines' guided ``eps_fn`` (``ddim_jax.guidance.guided_by`` of the UNet's model function),
  jitted and compiled ahead of time. Peer: diffusers' ``UNet2DConditionModel`` of the same config on the
  concatenated batch, ``chunk(2)`` and the same combination, in ``torch.inference_mode()``.
* Text encoder: CLIP ViT-L/14's text tower (``clip_text.SD15``, SD 1.x's, 123,060,480 parameters) on
  ``[2B, 77]`` token ids (the prompts and the negative prompts, one call, as ``pipelines.encode_prompts``):
  ours (``CLIPTextModel.encode``, jitted) against transformers' ``CLIPTextModel`` (its ``last_hidden_state``).

Both sides hold the same random weights (torch's initialisation, converted with the project's converters) and
take the same inputs; the outputs' largest difference is printed as a check that the same network is timed.
Each side is called ``--warmup`` times (at least once: the call that checks the outputs), then ``--iters``
interleaved rounds (one call of each side per round, so background load hits both alike); the ratios (torch
time / ours) are of the medians (and of the minima) of the same run. Both UNets' float32 weights take 6.9 GB,
and our attention holds its [rows, heads, 4096, 4096] scores at 64x64 latents (0.5 GB per row and matrix);
``--sequential`` times our UNet, frees it, then builds and times diffusers' (torch's initialisation from the
same seed: the same weights), for machines without ~16 GB free (the interleaved run peaked at 15.2 GB
resident on CPU): the two sides are then not interleaved. torch uses ``--threads`` threads (default: the
usable cores) on ``--torch-device``; ours runs on JAX's default device (XLA's CPU backend: one thread per
core). FLOPs: XLA's cost analysis of our compiled programs. ``--smoke``: tiny configurations (a two-level
UNet at 8x8, a two-layer text encoder), batch 1, one round: a quick test of this script.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import numpy as np
from _machine import ROOT, git_revision, interleaved, machine_description

sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: random weights

GUIDANCE = 7.5
# --smoke's networks: the SD 1.5 UNet's and CLIP ViT-L's structure at a few channels.
SMOKE_UNET = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=2,
                  cross_attention_dim=32, norm_groups=8)
SMOKE_TEXT = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,2", help="images per step (comma-separated); the UNet runs on twice as "
                   "many rows (guidance)")
    p.add_argument("--latent", type=int, default=64, help="latent side (64: 512x512 images)")
    p.add_argument("--iters", type=int, default=5, help="timed rounds (medians of these)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each side first")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch.set_num_threads")
    p.add_argument("--torch-device", default="cpu", help="where the torch models run (cuda on a GPU machine; JAX "
                   "takes its default device)")
    p.add_argument("--sequential", action="store_true", help="time our UNet, free it, then build and time "
                   "diffusers' (the same weights): one UNet's weights (3.4 GB) in memory at a time, not interleaved")
    p.add_argument("--no-text", action="store_true", help="skip the text encoders")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--smoke", action="store_true", help="tiny configurations, batch 1, one round: a quick test")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in str(args.batches).split(",") if b]
    if not args.batches or min(args.batches) < 1:
        p.error(f"--batches must be positive integers; got {args.batches}")
    if args.smoke:
        args.batches, args.latent, args.iters, args.warmup = [1], 8, 1, 0
    return args


def _synced(torch, out):
    """``out`` once the device has computed it (a CUDA call returns before)."""
    if out.device.type == "cuda":
        torch.cuda.synchronize(out.device)
    return out


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def _aot(fn, *args):
    """``fn`` jitted and compiled for ``args``: (the compiled program, seconds to lower and compile)."""
    import jax

    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def _row(name: str, ours: list, peer: list, flops: float | None, diff: float, compile_s: float) -> dict:
    jax_s, torch_s = statistics.median(ours), statistics.median(peer)
    return {"name": name, "jax_ms_median": 1e3 * jax_s, "jax_ms_min": 1e3 * min(ours),
            "torch_ms_median": 1e3 * torch_s, "torch_ms_min": 1e3 * min(peer),
            "torch_over_jax_median": torch_s / jax_s, "torch_over_jax_min": min(peer) / min(ours),
            "xla_gflops": None if flops is None else flops / 1e9, "max_abs_diff": diff, "jax_compile_s": compile_s}


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _timed(fns: dict, args) -> dict:
    """``{name: [seconds, ...]}`` of ``args.iters`` interleaved rounds, after ``args.warmup - 1`` more untimed
    calls of each (the outputs' check was the first)."""
    for _ in range(args.warmup - 1):
        for fn in fns.values():
            fn()
    return interleaved(fns, args.iters)


def unet_rows(args, torch, diffusers) -> list[dict]:
    """One guided UNet step per batch in ``args.batches``, ours and diffusers'."""
    import jax.numpy as jnp

    from ddim_jax.cond_unet import SD15, UNet2DCondition
    from ddim_jax.conditioning import Conditioning
    from ddim_jax.convert.stable_diffusion import convert_unet2d_condition
    from ddim_jax.guidance import guided_by
    from ddim_jax.nets import make_model_fn

    arch = dict(SD15, **(SMOKE_UNET if args.smoke else {}))

    def peer_model():  # the same weights every time: torch's initialisation from seed 0
        torch.manual_seed(0)
        return diffusers.UNet2DConditionModel(
            sample_size=args.latent, in_channels=arch["in_channels"], out_channels=arch["out_channels"],
            down_block_types=arch["down_block_types"], up_block_types=arch["up_block_types"],
            block_out_channels=arch["block_out_channels"], layers_per_block=arch["layers_per_block"],
            attention_head_dim=arch["attention_head_dim"], cross_attention_dim=arch["cross_attention_dim"],
            norm_num_groups=arch["norm_groups"], norm_eps=arch["norm_eps"],
            use_linear_projection=arch["use_linear_projection"], flip_sin_to_cos=arch["flip_sin_to_cos"],
            freq_shift=arch["freq_shift"]).eval().to(args.torch_device)

    _progress("UNet: building the torch model and converting its weights")
    peer = peer_model()
    params = convert_unet2d_condition(peer.state_dict(), **arch)
    if args.sequential:  # one model in memory at a time: torch's is built again (the same weights) below
        peer = None
        gc.collect()
    model_fn = make_model_fn(UNet2DCondition(**arch), params)
    del params
    inputs = {}
    for B in args.batches:
        rng = np.random.default_rng(B)
        x = rng.standard_normal((B, args.latent, args.latent, arch["in_channels"])).astype(np.float32)
        context, null = rng.standard_normal((2, B, 77, arch["cross_attention_dim"])).astype(np.float32)
        inputs[B] = (x, np.full((B,), 501, np.int32), context, null)

    def ours(B):
        """(the step, its output, seconds to compile, XLA FLOPs)"""
        x, t, context, null = inputs[B]
        cond, uncond = Conditioning(context=jnp.asarray(context)), Conditioning(context=jnp.asarray(null))
        eps_fn = guided_by(model_fn, cond, uncond, GUIDANCE)
        xj, tj = jnp.asarray(x), jnp.asarray(t)
        step, compile_s = _aot(lambda f, x, t: f(x, t), eps_fn, xj, tj)
        fn = lambda: step(eps_fn, xj, tj).block_until_ready()  # noqa: E731
        return fn, np.asarray(fn()).transpose(0, 3, 1, 2), compile_s, _flops(step)

    def theirs(B, peer):
        """(the step, its output): the batch doubled, chunked and combined as StableDiffusionPipeline does"""
        x, t, context, null = inputs[B]
        x2 = torch.from_numpy(np.concatenate([x, x]).transpose(0, 3, 1, 2).copy()).to(args.torch_device)
        t2 = torch.from_numpy(np.concatenate([t, t]).astype(np.int64)).to(args.torch_device)
        c2 = torch.from_numpy(np.concatenate([context, null])).to(args.torch_device)

        def fn():
            with torch.inference_mode():
                cond, uncond = peer(x2, t2, encoder_hidden_states=c2).sample.chunk(2)
                return _synced(torch, uncond + GUIDANCE * (cond - uncond))

        return fn, fn().cpu().numpy()

    found = {}  # B -> {"jax": times, "torch": times, ...}
    for B in args.batches:
        _progress(f"UNet step, batch {B}: compiling ours, then timing")
        fn, out, compile_s, flops = ours(B)
        found[B] = {"jax_out": out, "compile_s": compile_s, "flops": flops}
        if args.sequential:
            found[B]["jax"] = _timed({"jax": fn}, args)["jax"]
        else:
            torch_fn, found[B]["torch_out"] = theirs(B, peer)
            found[B].update(_timed({"jax": fn, "torch": torch_fn}, args))
    if args.sequential:
        model_fn = fn = None
        gc.collect()
        _progress("UNet: building the torch model again")
        peer = peer_model()
        for B in args.batches:
            _progress(f"UNet step, batch {B}: diffusers")
            torch_fn, found[B]["torch_out"] = theirs(B, peer)
            found[B]["torch"] = _timed({"torch": torch_fn}, args)["torch"]
    rows = []
    for B, f in found.items():
        diff = float(np.abs(f["jax_out"] - f["torch_out"]).max())
        rows.append(_row(f"UNet step, {B} image(s) (2x{B} rows)", f["jax"], f["torch"], f["flops"], diff,
                         f["compile_s"]))
        _progress(json.dumps(rows[-1]))
    return rows


def text_rows(args, torch, transformers) -> list[dict]:
    """The text encoder on the ids of B prompts and B negative prompts, for each B in ``args.batches``."""
    import jax.numpy as jnp

    from ddim_jax import clip_text
    from ddim_jax.convert.clip_text import clip_text_spec, convert_clip_text

    config = dict(clip_text.SD15, **(SMOKE_TEXT if args.smoke else {}))
    torch.manual_seed(0)
    peer = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config, bos_token_id=config["vocab_size"] - 2,
                                                                   pad_token_id=1)).eval()
    spec = clip_text_spec(dict(config, architectures=["CLIPTextModel"]), "benchmark")
    params = convert_clip_text(peer.state_dict(), spec)
    peer.to(args.torch_device)
    net = spec.build()
    rows = []
    for B in args.batches:
        rng = np.random.default_rng(B)
        ids = rng.integers(0, config["vocab_size"] - 2, (2 * B, 77)).astype(np.int32)
        ids[:, 0], ids[:, -1] = config["vocab_size"] - 2, config["vocab_size"] - 1  # start and end tokens
        idj = jnp.asarray(ids)
        encode, compile_s = _aot(lambda p, ids: net.apply({"params": p}, ids, 0, method="encode"), params, idj)
        idt = torch.from_numpy(ids.astype(np.int64)).to(args.torch_device)

        def torch_encode():
            with torch.inference_mode():
                return _synced(torch, peer(idt).last_hidden_state)

        fns = {"jax": lambda: encode(params, idj).block_until_ready(), "torch": torch_encode}
        _progress(f"text encoder, {2 * B} rows")
        diff = float(np.abs(np.asarray(fns["jax"]()) - torch_encode().cpu().numpy()).max())
        times = _timed(fns, args)
        rows.append(_row(f"text encoder, {2 * B}x77 ids", times["jax"], times["torch"], _flops(encode), diff,
                         compile_s))
        _progress(json.dumps(rows[-1]))
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)

    import diffusers
    import jax
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    res = {"command": "python benchmarks/sd_unet_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "revision": git_revision(), "machine": machine_description(), "jax": jax.__version__,
           "jax_device": str(jax.devices()[0]), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "transformers": transformers.__version__, "torch_threads": args.threads,
           "torch_device": args.torch_device, "latent": args.latent,
           "iters": args.iters, "warmup": args.warmup, "sequential": args.sequential,
           "loadavg_before": os.getloadavg()}
    rows = unet_rows(args, torch, diffusers)
    if not args.no_text:
        rows += text_rows(args, torch, transformers)
    res["loadavg_after"], res["rows"] = os.getloadavg(), rows

    print(json.dumps(res, indent=1))
    print(f"\n{jax.devices()[0].platform} (XLA) vs torch {torch.__version__} on {args.torch_device} "
          f"({args.threads} threads); latents {args.latent}x{args.latent}x4, context 77; {args.iters} rounds "
          f"({'UNets one after the other' if args.sequential else 'interleaved'}); "
          f"load average {res['loadavg_before'][0]:.1f} before, {res['loadavg_after'][0]:.1f} after")
    print("| what | ours median ms | torch median ms | torch / ours (median) | ours min ms | torch min ms | "
          "torch / ours (min) | XLA GFLOPs | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gflops = "" if r["xla_gflops"] is None else f"{r['xla_gflops']:.1f}"
        print(f"| {r['name']} | {r['jax_ms_median']:.1f} | {r['torch_ms_median']:.1f} | "
              f"{r['torch_over_jax_median']:.2f}x | {r['jax_ms_min']:.1f} | {r['torch_ms_min']:.1f} | "
              f"{r['torch_over_jax_min']:.2f}x | {gflops} | {r['max_abs_diff']:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
