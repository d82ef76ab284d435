"""Fine-tuning the embedded digits model to the digits 0-4, before and after: the base model (configs/digits.py,
trained first with `python train.py`), full fine-tuning (configs/digits_finetune.py) and rank-4 LoRA
(configs/digits_lora.py), both trained here, in this process, from the base model.

For each model it draws N samples (DDIM, eta = 0, S = 50, seed 0) and reports:
  * the share of samples the digits CNN (ddim_jax.digits_classifier) reads as one of the kept classes, and
    the share it reads with confidence >= 0.9;
  * FID in the digits CNN's features between the samples and the held-out digits of the kept classes, next
    to the floor: the training digits of those classes against the same held-out digits (N defaults to
    their number, so both carry the same small-sample bias);
  * for a fine-tuned run: its learning rate, steps, the wall time of its training (training.train in this
    process: compiling, the steps, checkpoints and exports; the machine's load average before and after), and
    the size of what it saves: the LoRA file (lora.safetensors) against the full model's weights.
A grid of the first 100 samples of each model is written to --out (finetune_<name>.png).

    python benchmarks/finetune_quality.py --base=runs/digits --runs=runs/finetune
    python benchmarks/finetune_quality.py --base=runs/digits --runs=runs/ft_sweep --configs=digits_finetune \\
        --lrs=1e-4,3e-4,1e-3 --out=runs/ft_sweep     # the learning-rate sweep: one run per rate
        [--train_steps=800]                          # (and another number of steps than the configs')

A run whose workdir under --runs already holds its finished model is measured without training again when
--reuse is given (its training time is the one recorded beside it, train_time.json); without --reuse an
existing workdir is refused.

``--smoke`` fine-tunes a random one-level model for 2 steps per config on one device and draws 20 samples
with S = 2, in a temporary directory: a quick test of this script.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
from _machine import ROOT, git_revision, machine_description, random_model, sampling_batch, scratch_dir, tiny_unet
from digits_quality import cnn_features, cnn_reader

CONFIGS = ("digits_finetune", "digits_lora")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="runs/digits", help="the model fine-tuned: a model directory or a workdir")
    p.add_argument("--runs", default="runs/finetune", help="where the fine-tuned runs' workdirs go")
    p.add_argument("--configs", default=",".join(CONFIGS), help="configs/<name>.py to fine-tune with")
    p.add_argument("--lrs", default="", help="learning rates to train each config at (default: the config's)")
    p.add_argument("--train_steps", type=int, default=0, help="training steps (default: the config's)")
    p.add_argument("--classes", default="0,1,2,3,4", help="the kept classes (the configs' data.classes)")
    p.add_argument("--num", type=int, default=0, help="samples per model (0: the kept training digits' count)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--reuse", action="store_true", help="measure finished runs in --runs without training again")
    p.add_argument("--smoke", action="store_true", help="a random tiny model, 2 steps, 20 samples, S = 2")
    args = p.parse_args(argv)
    if args.num == 1 or args.num < 0:
        p.error("--num must be at least 2 (the FID needs the covariance of at least two samples), or 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        scratch = scratch_dir()
        args.base, args.runs, args.out = random_model("digits", tiny_unet), scratch, scratch
        args.num, args.steps = 20, 2
    return report(args)


def load_config(name: str, args):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import importlib

    c = importlib.import_module(f"configs.{name}").get_config()
    c.training.init_from = args.base
    c.data.classes = tuple(int(k) for k in args.classes.split(","))
    if args.smoke:  # the tiny random base: 2 steps on one device
        c.training.update(num_steps=2, batch_size=8, warmup_steps=1, log_every=1, checkpoint_every=2,
                          sample_every=0)
    return c


def train_run(config, workdir: str, args) -> dict:
    """Trains ``config`` into ``workdir`` (or, with --reuse, reads a finished run's time): ``{seconds, load}``."""
    import jax

    from ddim_jax import files, training

    record = os.path.join(workdir, "train_time.json")
    if os.path.exists(workdir):
        if args.reuse and os.path.exists(record):
            with open(record) as f:
                return json.load(f)
        raise SystemExit(f"{workdir} exists: pass --reuse to measure its finished run, or another --runs")
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    training.train(config, workdir, progress=False, devices=jax.devices()[:1] if args.smoke else None)
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "load_before": load0, "load_after": os.getloadavg(),
           "steps": config.training.num_steps, "lr": config.training.lr}
    files.write_json(record, out)
    return out


def weights_bytes(model_dir: str) -> int:
    return sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir)
               if f.endswith(".safetensors"))


def report(args):
    import jax

    from ddim_jax import fid
    from ddim_jax import experiments as ex
    from ddim_jax.data import load_digits
    from ddim_jax.images import save_grid
    from ddim_jax.loading import load_model

    classes = [int(k) for k in args.classes.split(",")]
    train_x, train_y = load_digits("train")
    test_x, test_y = load_digits("test")
    train_x, test_x = train_x[np.isin(train_y, classes)], test_x[np.isin(test_y, classes)]
    num = args.num or len(train_x)
    probs, cnn_acc = cnn_reader()
    feats = cnn_features()
    f_test = feats(test_x)
    os.makedirs(args.out, exist_ok=True)
    print(f"machine: {machine_description()}; jax {jax.__version__}, {jax.devices()[0].platform}; checkout "
          f"{git_revision()}", flush=True)

    def measure(name, path):
        model = load_model(path)
        samples = ex.generate(model, num, sampling_batch(model, num, 250), args.steps, seed=0, progress=False)
        p = probs(samples)
        save_grid(samples[:100], os.path.join(args.out, f"finetune_{name}.png"), ncol=10, scale=4)
        return {"kept": float(np.isin(p.argmax(1), classes).mean()), "confident": float((p.max(1) >= 0.9).mean()),
                "per_class": np.bincount(p.argmax(1), minlength=10).tolist(),
                "fid": fid.fid_from_features(feats(samples[:len(train_x)]), f_test)}

    rows = [("base", args.base, None, measure("base", args.base))]
    lrs = [float(v) for v in args.lrs.split(",")] if args.lrs else [None]
    for config_name in args.configs.split(","):
        for lr in lrs:
            c = load_config(config_name, args)
            if lr is not None:
                c.training.lr = lr
            if args.train_steps:
                c.training.num_steps = args.train_steps
            name = (config_name.removeprefix("digits_") + (f"_lr{lr:g}" if lr is not None else "")
                    + (f"_{args.train_steps}steps" if args.train_steps else ""))
            workdir = os.path.join(args.runs, name)
            timing = train_run(c, workdir, args)
            rows.append((name, workdir, dict(timing, lora=c.training.lora.rank is not None),
                         measure(name, workdir)))
            print(f"{name}: trained in {timing['seconds']:.0f} s; {rows[-1][3]}", flush=True)

    kept = f"{classes[0]}-{classes[-1]}" if classes == list(range(classes[0], classes[-1] + 1)) else ",".join(
        map(str, classes))
    print(f"\nbase: {args.base}; {num} samples per model (DDIM S = {args.steps}, seed 0); digits CNN held-out "
          f"accuracy {cnn_acc:.3f}; FID against the {len(test_x)} held-out digits {kept}")
    print(f"| model | lr | steps | train wall | load avg (1 min) before / after | read as {kept} | "
          f"confidence >= 0.9 | FID (CNN features) | samples per class 0..9 | saved weights |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    full_bytes = weights_bytes(os.path.join(args.base, "model") if os.path.isdir(os.path.join(args.base, "model"))
                               else args.base)
    for name, path, timing, m in rows:
        if timing is None:
            run, saved = "| | | | |", f"model {full_bytes / 1024:.0f} KiB"
        else:
            run = (f"| {timing['lr']:g} | {timing['steps']} | {timing['seconds']:.0f} s | "
                   f"{timing['load_before'][0]:.1f} / {timing['load_after'][0]:.1f} |")
            lora_file = os.path.join(path, "lora.safetensors")
            saved = (f"lora.safetensors {os.path.getsize(lora_file) / 1024:.1f} KiB" if timing["lora"]
                     else f"model {weights_bytes(os.path.join(path, 'model')) / 1024:.0f} KiB")
        print(f"| {name} {run} {m['kept']:.3f} | {m['confident']:.3f} | {m['fid']:.2f} | "
              f"{' '.join(map(str, m['per_class']))} | {saved} |")
    floor = fid.fid_from_features(feats(train_x), f_test)
    real = probs(test_x)
    print(f"| held-out real digits {kept} (FID: the {len(train_x)} training digits {kept}, the floor) | | | | | "
          f"{np.isin(real.argmax(1), classes).mean():.3f} | {(real.max(1) >= 0.9).mean():.3f} | {floor:.2f} | | |")
    print(f"grids: {os.path.join(args.out, 'finetune_<model>.png')}")


if __name__ == "__main__":
    main()
