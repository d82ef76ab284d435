"""Training-step benchmark: ddim_jax's train step against the same step in PyTorch (diffusers), same run.

Ours: ``ddim_jax.training.make_train_step`` with ``configs/paper.py:cifar10`` (the paper's 35,746,307-parameter
UNet, dropout 0.1, Adam lr 2e-4 with linear warmup, global-norm clipping at 1.0, EMA 0.9999, random
horizontal flips, L_simple with uniform t and Gaussian noise) at ``training.batch_size = --batch`` on a
1-device mesh (``ddim_jax.parallel.make_mesh``), ``steps_per_dispatch = 1``, the state laid out as
``training.init_state`` makes it with random weights drawn on the host (``_machine.random_state``: no
initialiser to compile; the network: ``ddim_jax.training.run.build(config).spec.build()``), fed a fixed
random uint8 batch of shape ``[1, B, 32, 32, 3]``. The step is compiled ahead of time (``lower().compile()``), so the
compile time is reported on its own; XLA's cost analysis of that program gives the FLOPs per step.

Peer: diffusers ``UNet2DModel`` with google/ddpm-cifar10-32's architecture and ``dropout=0.1`` in train
mode, doing what our step does: uint8 -> [-1, 1], random flip, t ~ U{0..T-1}, noise ~ N(0, I),
x_t = sqrt(a) x0 + sqrt(1 - a) noise, MSE against the noise, backward, ``clip_grad_norm_(1.0)``,
``torch.optim.Adam`` (betas 0.9/0.999, eps 1e-8 as optax) with ``LambdaLR(min((k + 1) / warmup, 1))``,
skip the update if the loss or the gradient norm is not finite, EMA update with ``torch._foreach_lerp_``.

Checks (cheap, before timing): (1) with the same weights (the torch init, converted with
``ddim_jax.convert.convert_diffusers``), the same x_t, t and noise and dropout off, both sides give the
same loss and gradient; (2) our optimizer (``training.make_optimizer``) + EMA and the torch optimizer +
EMA give the same updates over 3 steps on a small random tree (run with a large lr, short warmup and
decay 0.5 so the differences are measurable in float32).

Timing: ``--warmup`` untimed rounds, then ``--iters`` interleaved rounds (one step of ours, then one of
torch), so background load hits both alike; medians and minimums. torch uses ``--threads`` threads (default:
the cores this process may use, which is what XLA's CPU thread pool is sized to). ``--breakdown`` also
times the gradient alone (forward + backward, dropout off, no optimizer) on both sides.

    python benchmarks/train_step.py [--config configs/paper.py:cifar10] [--batch 16] [--iters 10] [--warmup 2]
        [--threads N] [--json PATH] [--smoke]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import statistics
import sys
import time

from _machine import git_revision, interleaved, machine_description, random_state, tiny_unet  # benchmarks/_machine.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout


def diffusers_unet_config(model_kwargs: dict, image_size: int) -> dict:
    """diffusers ``UNet2DModel`` arguments for DDPM's UNet with our ``UNet`` kwargs (google/ddpm-* style)."""
    assert model_kwargs.get("resamp_with_conv", True) and model_kwargs.get("num_classes") is None
    mult, attn = model_kwargs["ch_mult"], model_kwargs["attn_resolutions"]
    res, down = image_size, []
    for level in range(len(mult)):
        down.append("AttnDownBlock2D" if res in attn else "DownBlock2D")
        if level != len(mult) - 1:
            res //= 2
    return dict(sample_size=image_size, in_channels=3, out_channels=model_kwargs["out_ch"],
                block_out_channels=tuple(model_kwargs["ch"] * m for m in mult),
                layers_per_block=model_kwargs["num_res_blocks"], down_block_types=tuple(down),
                up_block_types=tuple(d.replace("Down", "Up") for d in reversed(down)), attention_head_dim=None,
                downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
                norm_num_groups=model_kwargs["norm_groups"],
                act_fn="silu", center_input_sample=False, mid_block_scale_factor=1,
                time_embedding_type="positional", dropout=model_kwargs["dropout"])


def load_config(path: str):
    """``file.py`` or ``file.py:arg`` (as train.py's ``--config``): ``get_config()`` or ``get_config(arg)``."""
    arg = None
    if not os.path.isfile(path) and ":" in path:
        path, arg = path.rsplit(":", 1)
    module_spec = importlib.util.spec_from_file_location("bench_config", path)
    mod = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(mod)
    return mod.get_config() if arg is None else mod.get_config(arg)


def make_torch_optimizer(torch, params, *, lr: float, warmup: int, adam_impl: str):
    kw = {"fused": True} if adam_impl == "fused" else {"foreach": True} if adam_impl == "foreach" else {}
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, **kw)
    w = max(warmup, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min((k + 1) / w, 1.0))
    return opt, sched


def torch_update(torch, params, ema, opt, sched, loss, *, clip: float, decay: float) -> tuple[float, float]:
    """Clip, Adam step, EMA; skipped (as ours) when the loss or the gradient norm is not finite."""
    gnorm = torch.nn.utils.clip_grad_norm_(params, clip)
    if bool(torch.isfinite(loss)) and bool(torch.isfinite(gnorm)):
        opt.step()
        sched.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1.0 - decay)
    opt.zero_grad(set_to_none=True)
    return float(loss.detach()), float(gnorm)


def check_optimizer(config, adam_impl: str) -> dict:
    """Our make_optimizer + EMA against the torch optimizer + EMA, 3 steps on a small random tree."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import torch

    from ddim_jax.training import make_optimizer

    c = config.copy_and_resolve_references()
    c.training.lr, c.training.warmup_steps, decay = 0.1, 3, 0.5
    rng = np.random.default_rng(1)
    p0 = [rng.standard_normal(s).astype(np.float32) for s in ((64, 32), (32,), (3, 3, 4, 8))]
    grads = [[(3.0 * rng.standard_normal(p.shape)).astype(np.float32) for p in p0] for _ in range(3)]  # norm >> 1
    tx = make_optimizer(c)

    @jax.jit  # the 3 steps as one program: one compile instead of one per operation
    def ours(p, grads):
        ema, opt_state = p, tx.init(p)
        for g in grads:
            upd, opt_state = tx.update(g, opt_state, p)
            p = optax.apply_updates(p, upd)
            ema = jax.tree.map(lambda e, q: decay * e + (1.0 - decay) * q, ema, p)
        return p, ema

    p, ema = ours([jnp.asarray(x) for x in p0], [[jnp.asarray(x) for x in g] for g in grads])
    tp = [torch.tensor(x, requires_grad=True) for x in p0]
    tema = [torch.tensor(x) for x in p0]
    opt, sched = make_torch_optimizer(torch, tp, lr=c.training.lr, warmup=c.training.warmup_steps, adam_impl=adam_impl)
    for g in grads:
        for t_, x in zip(tp, g):
            t_.grad = torch.tensor(x)
        torch_update(torch, tp, tema, opt, sched, torch.tensor(0.0), clip=c.training.grad_clip, decay=decay)
    rel = lambda a, b, ref: float(max(np.abs(np.asarray(x) - y.detach().numpy()).max() /  # noqa: E731
                                      np.abs(np.asarray(x) - r).max() for x, y, r in zip(a, b, ref)))
    return {"optimizer_check_param_update_max_rel_diff": rel(p, tp, p0),
            "optimizer_check_ema_update_max_rel_diff": rel(ema, tema, p0)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "paper.py") + ":cifar10",
                        help="a config file, or file:setup as train.py's --config (default: configs/paper.py:cifar10)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch.set_num_threads; XLA's CPU backend uses one thread per usable core")
    parser.add_argument("--torch-adam", default="fused", choices=("fused", "foreach", "loop"),
                        help="torch.optim.Adam implementation (fused is torch's fastest on CPU)")
    parser.add_argument("--breakdown", type=int, default=3,
                        help="rounds timing the gradient alone (forward + backward, dropout off) on both sides; "
                             "0 = skip")
    parser.add_argument("--no-check", action="store_true", help="skip the equivalence checks")
    parser.add_argument("--smoke", action="store_true",
                        help="a one-level UNet at 8x8, batch 2, one step of each, to test this script quickly")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.iters, args.warmup, args.breakdown = 2, 1, 0, 1
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
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from ddim_jax.convert import convert_diffusers
    from ddim_jax.diffusion import per_example_loss
    from ddim_jax.parallel import BATCH_AXES, as_train_mesh, make_mesh
    from ddim_jax.training.run import build
    from ddim_jax.training.state import cached_train_step
    from ddim_jax.unet import count_params

    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    config.training.batch_size = args.batch
    config.training.steps_per_dispatch = 1
    if args.smoke:
        tiny_unet(config)
    B, size, ch = args.batch, config.data.image_size, config.data.channels
    t_cfg = config.training

    res = {"command": "python " + shlex.join(["benchmarks/train_step.py"] + argv),
           "git": git_revision(), "machine": machine_description(), "jax": jax.__version__, "flax": flax.__version__,
           "jax_backend": jax.default_backend(), "jax_devices": len(jax.devices()), "torch": torch.__version__,
           "diffusers": diffusers.__version__, "torch_threads": args.threads, "torch_adam": args.torch_adam,
           "batch": B, "image_size": size, "iters": args.iters, "warmup": args.warmup,
           "random_flip": bool(config.data.random_flip), "dropout": config.model.dropout, "lr": t_cfg.lr,
           "warmup_steps": t_cfg.warmup_steps, "grad_clip": t_cfg.grad_clip, "ema_decay": t_cfg.ema_decay,
           "loadavg_1min_start": os.getloadavg()[0]}
    print(f"load average (1 min) at start: {res['loadavg_1min_start']:.2f}", flush=True)

    # ---- ours: the state and the AOT-compiled step on a 1-device mesh.
    mesh = as_train_mesh(make_mesh(jax.devices()[:1]))
    run = build(config)
    spec = run.spec
    schedule = spec.make_schedule()
    state = random_state(run, mesh)
    res["params"] = count_params(state.params)
    images_np = np.random.default_rng(0).integers(0, 256, (1, B, size, size, ch), dtype=np.uint8)
    images = jax.device_put(images_np, NamedSharding(mesh, P(None, BATCH_AXES)))
    labels = jax.device_put(np.zeros((1, B), np.int32), NamedSharding(mesh, P(None, BATCH_AXES)))  # not read
    step_fn = cached_train_step(run, mesh)  # make_train_step: the config's network, optimizer and schedule
    t0 = time.perf_counter()
    lowered = step_fn.lower(state, images, labels, {})
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    res["jax_lower_s"], res["jax_compile_s"] = t1 - t0, t2 - t1
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost["flops"])
    res["xla_gflops_per_step"] = flops / 1e9
    res["xla_gbytes_accessed_per_step"] = float(cost.get("bytes accessed", float("nan"))) / 1e9
    t0 = time.perf_counter()
    state, metrics = compiled(*step_fn.arguments(state, images, labels, {}))
    jax.block_until_ready((state, metrics))
    res["jax_first_call_s"] = time.perf_counter() - t0
    res["jax_first_loss"] = float(metrics["loss"][0])
    print(f"ours: lower {res['jax_lower_s']:.1f} s, compile {res['jax_compile_s']:.1f} s, first call "
          f"{res['jax_first_call_s']:.2f} s, {res['xla_gflops_per_step']:.1f} GFLOPs/step (XLA)", flush=True)

    # ---- torch: the same network (diffusers' random init) and step.
    torch.manual_seed(0)
    dcfg = diffusers_unet_config({**dict(config.model), "out_ch": ch, "ch_mult": tuple(config.model.ch_mult),
                                  "attn_resolutions": tuple(config.model.attn_resolutions)}, size)
    tmodel = diffusers.UNet2DModel(**dcfg).train()
    res["torch_params"] = sum(p.numel() for p in tmodel.parameters())
    tparams = [p for p in tmodel.parameters()]
    tema = [p.detach().clone() for p in tparams]
    opt, sched = make_torch_optimizer(torch, tparams, lr=t_cfg.lr, warmup=t_cfg.warmup_steps, adam_impl=args.torch_adam)
    T = schedule.num_timesteps
    alpha_bar = torch.from_numpy(np.asarray(schedule.alpha_bar(np.arange(T)), np.float32))
    timgs = torch.from_numpy(images_np[0])  # [B, H, W, C] uint8
    flip_enabled = bool(config.data.random_flip)

    def torch_loss(x0, t, noise, model_=tmodel):
        a = alpha_bar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1.0 - a).sqrt() * noise
        return torch.nn.functional.mse_loss(model_(x_t, t).sample, noise)

    def torch_step():
        x0 = timgs.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if flip_enabled:
            x0 = torch.where((torch.rand(B) < 0.5).view(-1, 1, 1, 1), x0.flip(3), x0)
        t = torch.randint(0, T, (B,))
        noise = torch.randn_like(x0)
        loss = torch_loss(x0, t, noise)
        loss.backward()
        return torch_update(torch, tparams, tema, opt, sched, loss, clip=t_cfg.grad_clip, decay=t_cfg.ema_decay)

    # ---- checks: same loss and gradient with the same weights and inputs; same optimizer + EMA.
    grad_fn = None
    if not args.no_check or args.breakdown:
        cspec, cparams = convert_diffusers(tmodel.state_dict(), dict(tmodel.config))
        assert cspec.architecture() == spec.architecture(), (cspec.architecture(), spec.architecture())
        eval_model = spec.build()
        rng = np.random.default_rng(2)
        x0_np = images_np[0].astype(np.float32) / 127.5 - 1.0
        t_np = rng.integers(0, T, (B,)).astype(np.int32)
        noise_np = rng.standard_normal(x0_np.shape).astype(np.float32)

        def jax_loss(p, x0, t, noise):
            eps_fn = lambda x, tt: eval_model.apply({"params": p}, x, tt, train=False)  # noqa: E731
            return jnp.mean(per_example_loss(eps_fn, schedule, x0, t, noise))

        grad_fn = jax.jit(jax.value_and_grad(jax_loss)).lower(cparams, x0_np, t_np, noise_np).compile()
        jargs = (cparams, jnp.asarray(x0_np), jnp.asarray(t_np), jnp.asarray(noise_np))
        to_nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
        targs = (to_nchw(x0_np), torch.from_numpy(t_np).long(), to_nchw(noise_np))
        ref_model = diffusers.UNet2DModel(**dcfg).eval()
        ref_model.load_state_dict(tmodel.state_dict())
    if not args.no_check:
        jl, jg = grad_fn(*jargs)
        tl = torch_loss(*targs, model_=ref_model)
        tl.backward()
        tg = {n: p.grad.numpy() for n, p in ref_model.named_parameters()}
        jnorm = float(np.sqrt(sum(float((np.asarray(g, np.float64) ** 2).sum()) for g in jax.tree.leaves(jg))))
        tnorm = float(np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in tg.values())))
        tl = float(tl.detach())
        res["check_loss_jax"], res["check_loss_torch"] = float(jl), tl
        res["check_loss_rel_diff"] = abs(float(jl) - tl) / abs(tl)
        res["check_grad_norm_jax"], res["check_grad_norm_torch"] = jnorm, tnorm
        res["check_grad_norm_rel_diff"] = abs(jnorm - tnorm) / tnorm
        ref = tg["conv_out.bias"]
        res["check_conv_out_bias_grad_max_rel_diff"] = float(np.abs(np.asarray(jg["conv_out"]["bias"]) - ref).max()
                                                             / np.abs(ref).max())
        ref = tg["conv_in.weight"].transpose(2, 3, 1, 0)  # OIHW -> HWIO
        res["check_conv_in_kernel_grad_max_rel_diff"] = float(np.abs(np.asarray(jg["conv_in"]["kernel"]) - ref).max()
                                                              / np.abs(ref).max())
        ref_model.zero_grad(set_to_none=True)
        res.update(check_optimizer(config, args.torch_adam))
        checks = {k: v for k, v in res.items() if k.startswith(("check_", "optimizer_check"))}
        print("checks: " + ", ".join(f"{k} {v:.3g}" for k, v in checks.items()), flush=True)

    # ---- timing, interleaved.
    t0 = time.perf_counter()
    res["torch_first_loss"] = torch_step()[0]
    res["torch_first_call_s"] = time.perf_counter() - t0

    def jax_step():
        nonlocal state
        state, m = compiled(*step_fn.arguments(state, images, labels, {}))
        jax.block_until_ready((state, m))
        return float(m["loss"][0])

    runners = {"jax": jax_step, "torch": torch_step}
    times = {name: [] for name in runners}
    losses = {name: [] for name in runners}
    res["loadavg_1min_before"] = os.getloadavg()[0]
    for i in range(args.warmup + args.iters):
        row = {}
        for name, fn in runners.items():
            t0 = time.perf_counter()
            out = fn()
            row[name] = time.perf_counter() - t0
            if i >= args.warmup:
                times[name].append(row[name])
                losses[name].append(out if name == "jax" else out[0])
        print(f"round {i}: " + ", ".join(f"{n} {dt:.3f} s" for n, dt in row.items())
              + (" (warm-up)" if i < args.warmup else ""), flush=True)
    res["loadavg_1min_after"] = os.getloadavg()[0]
    res["jax_final_step"] = int(np.asarray(state.step))
    res["jax_nonfinite_total"] = int(np.asarray(state.nonfinite_total))
    for name in runners:
        ts = times[name]
        res[f"{name}_s_per_step_all"] = ts
        res[f"{name}_s_per_step_median"] = statistics.median(ts)
        res[f"{name}_s_per_step_min"] = min(ts)
        res[f"{name}_s_per_step_max"] = max(ts)
        res[f"{name}_images_per_s_median"] = B / statistics.median(ts)
        res[f"{name}_images_per_s_best"] = B / min(ts)
        res[f"{name}_gflop_s_median"] = flops / 1e9 / statistics.median(ts)
        res[f"{name}_gflop_s_best"] = flops / 1e9 / min(ts)
        res[f"{name}_mean_loss"] = float(np.mean(losses[name]))
    res["ratio_ours_over_torch_median"] = res["torch_s_per_step_median"] / res["jax_s_per_step_median"]
    res["ratio_ours_over_torch_best"] = res["torch_s_per_step_min"] / res["jax_s_per_step_min"]
    assert all(np.isfinite(losses["jax"])) and all(np.isfinite(losses["torch"]))

    # ---- breakdown: the gradient alone (forward + backward, dropout off, no optimizer, no RNG).
    if args.breakdown:
        cost = grad_fn.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        gflops_grad = float(cost["flops"]) / 1e9
        res["xla_gflops_grad_only"] = gflops_grad

        def jax_grad():
            jax.block_until_ready(grad_fn(*jargs))

        def torch_grad():
            torch_loss(*targs, model_=ref_model).backward()
            ref_model.zero_grad(set_to_none=True)

        torch_grad()  # warm-up
        gt = interleaved({"jax": jax_grad, "torch": torch_grad}, args.breakdown)
        for name in gt:
            res[f"{name}_grad_only_s_all"] = gt[name]
            res[f"{name}_grad_only_s_median"] = statistics.median(gt[name])
            res[f"{name}_grad_only_s_min"] = min(gt[name])
        res["loadavg_1min_end"] = os.getloadavg()[0]

    print(json.dumps(res, indent=2))
    print()
    m = res["machine"]
    print(f"Machine: {m.get('Model name', platform.processor())}, {m['cpus_usable']} usable cores "
          f"({m.get('Thread(s) per core', '?')} thread(s) per core), {platform.platform()}; jax {jax.__version__} "
          f"({jax.default_backend()}), flax {flax.__version__}, torch {torch.__version__} ({args.threads} threads, "
          f"Adam {args.torch_adam}), diffusers {diffusers.__version__}")
    print(f"Command: `{res['command']}` (checkout {res['git']})")
    print(f"Load average (1 min): {res['loadavg_1min_start']:.2f} at start, {res['loadavg_1min_before']:.2f} before "
          f"timing, {res['loadavg_1min_after']:.2f} after")
    print(f"ours: lower {res['jax_lower_s']:.1f} s + compile {res['jax_compile_s']:.1f} s (first call, compile "
          f"excluded: {res['jax_first_call_s']:.2f} s); torch first step {res['torch_first_call_s']:.2f} s; "
          f"{res['params']:,} params ours, {res['torch_params']:,} torch")
    print()
    print(f"| implementation (batch {B}) | median s/step | min s/step | images/s (median) | images/s (best) | "
          f"GFLOPs/step (XLA) | GFLOP/s (median) | GFLOP/s (best) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, label in (("jax", "ddim_jax make_train_step (jit, 1-device mesh)"),
                        ("torch", f"diffusers UNet2DModel + torch Adam ({args.threads} threads)")):
        print(f"| {label} | {res[f'{name}_s_per_step_median']:.3f} | {res[f'{name}_s_per_step_min']:.3f} | "
              f"{res[f'{name}_images_per_s_median']:.2f} | {res[f'{name}_images_per_s_best']:.2f} | "
              f"{flops / 1e9:.1f} | {res[f'{name}_gflop_s_median']:.1f} | {res[f'{name}_gflop_s_best']:.1f} |")
    print()
    print(f"ours / torch (images/s): {res['ratio_ours_over_torch_median']:.2f}x at the medians, "
          f"{res['ratio_ours_over_torch_best']:.2f}x at the minima (goal >= 1.3x: "
          f"{'met' if res['ratio_ours_over_torch_median'] >= 1.3 else 'NOT met'} at the medians)")
    if args.breakdown:
        print(f"gradient alone (fwd + bwd, dropout off, {res['xla_gflops_grad_only']:.1f} GFLOPs XLA): ours "
              f"{res['jax_grad_only_s_median']:.3f} s median / {res['jax_grad_only_s_min']:.3f} s min, torch "
              f"{res['torch_grad_only_s_median']:.3f} / {res['torch_grad_only_s_min']:.3f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
