"""Input pipeline throughput on 256x256 JPEGs: images/s of ``ddim_jax.data.BatchLoader`` alone.

The data: ``--images`` JPEG files of ``--size`` (default 320x384, quality 90, smooth random content with
noise, as photographs decode), written to a temporary directory. Each record read opens its file and
decodes it with PIL, as ``tfds.data_source`` decodes the JPEG bytes of a prepared LSUN or CelebA split;
``RecordSource`` then center-crops and resizes it to 256x256, as training does. The loader serves
``--steps`` consecutive global batches of ``--batch`` images (after one untimed step), with 0 workers (in
the training loop's thread, as before the loader existed), 2, and all usable cores.

What a training step consumes: XLA's FLOP count of one train step of ``configs/paper.py:lsun_church256``
(compiled here at batch ``--flops_batch``, not run) divided into an accelerator's sustained rate
(``--tflops``, default 300 TFLOP/s: about a third of an H100's dense bf16 peak) gives the images/s the
pipeline must feed one such device. That is an estimate, not a measurement.

    python benchmarks/input_pipeline.py [--images 256] [--batch 64] [--steps 6] [--workers 0,2,all]
        [--tflops 300] [--skip_flops] [--json PATH] [--smoke]

--smoke: 4 small JPEGs, batch 2, one step, 0 and 2 workers, the FLOPs of a tiny UNet's step: a quick test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
from _machine import ROOT, git_revision, machine_description, tiny_unet

sys.path.insert(0, str(ROOT))


class JpegFiles:
    """Random access to JPEG files, decoded on read (what a tfds record read does with its image bytes)."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return {"image": np.asarray(im.convert("RGB"))}


def write_jpegs(folder, n, height, width, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        coarse = rng.integers(0, 256, (height // 32, width // 32, 3), dtype=np.uint8)
        im = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        arr = np.clip(np.asarray(im, np.int16) + rng.integers(-12, 13, (height, width, 3)), 0, 255).astype(np.uint8)
        path = os.path.join(folder, f"{i:05d}.jpg")
        Image.fromarray(arr).save(path, quality=90)
        paths.append(path)
    return paths


def step_flops_per_image(batch, smoke=False):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from configs.paper import get_config
    from ddim_jax.parallel import make_mesh
    from ddim_jax.training.run import build
    from ddim_jax.training.state import abstract_state, make_train_step

    # --smoke: memory_plan.py's and op_profile.py's tiny cifar10 step at their batch (2), compiled once for all three
    c = tiny_unet(get_config("cifar10")) if smoke else get_config("lsun_church256")
    c.training.batch_size = batch
    mesh = make_mesh(jax.devices()[:1])
    rows = NamedSharding(mesh, P(None, "data"))
    size = c.data.image_size
    images = jax.ShapeDtypeStruct((1, batch, size, size, 3), jnp.uint8, sharding=rows)
    labels = jax.ShapeDtypeStruct((1, batch), jnp.int32, sharding=rows)
    run = build(c)
    cost = make_train_step(run, mesh).jitted.lower(abstract_state(run, mesh), images, labels, {}).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) / batch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--size", default="320x384")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--workers", default="0,2,all")
    p.add_argument("--tflops", type=float, default=300.0)
    p.add_argument("--flops_batch", type=int, default=4)
    p.add_argument("--skip_flops", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true", help="a few small JPEGs, one step, a tiny UNet: a quick test")
    a = p.parse_args(argv)
    if a.smoke:
        a.images, a.size, a.batch, a.steps, a.workers, a.flops_batch = 4, "64x64", 2, 1, "0,2", 2
    return a


def main(argv=None):
    a = parse_args(argv)

    from ddim_jax.data import BatchLoader, RecordSource, usable_cores

    height, width = map(int, a.size.split("x"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(tmp, a.images, height, width)
        source = RecordSource(JpegFiles(paths), "jpegs", 256, "center")
        print(f"{a.images} JPEGs of {height}x{width}, {sum(map(os.path.getsize, paths)) / len(paths) / 1024:.0f} KiB "
              f"each; global batch {a.batch}; {usable_cores()} usable cores; checkout {git_revision()}")
        print("| workers | images/s | s per batch |")
        print("|---|---|---|")
        for w in a.workers.split(","):
            workers = usable_cores() if w == "all" else int(w)
            with BatchLoader(source, a.batch, 0, workers=workers, prefetch=2) as load:
                load(0)
                t0 = time.perf_counter()
                for s in range(1, a.steps + 1):
                    batch = load(s)
                secs = time.perf_counter() - t0
            assert batch.shape == (a.batch, 256, 256, 3)
            ips = a.steps * a.batch / secs
            rows.append({"workers": w, "images_per_s": ips, "s_per_batch": secs / a.steps})
            print(f"| {w} ({workers}) | {ips:.0f} | {secs / a.steps:.3f} |", flush=True)
    need = None
    if not a.skip_flops:
        per_image = step_flops_per_image(a.flops_batch, a.smoke)
        need = a.tflops * 1e12 / per_image
        print(f"lsun_church256 train step: {per_image / 1e9:.0f} GFLOP per image (XLA); at {a.tflops:.0f} TFLOP/s a "
              f"device consumes about {need:.0f} images/s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "images_per_s_needed": need, "tflops": a.tflops, "revision": git_revision(),
                       "machine": machine_description()}, f, indent=1)


if __name__ == "__main__":
    main()
