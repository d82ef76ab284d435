"""Input pipeline throughput on 256x256 JPEGs: images/s of the grain loader (``ddim_jax.data.BatchLoader``)
against the threaded loader it replaced, measured in the same run.

The data: ``--images`` JPEG files of ``--size`` (default 320x384, quality 90, smooth random content with
noise, as photographs decode), written to a temporary directory and read as a ``data.folder`` dataset
(``ddim_jax.data.FolderSource``): each image is opened and decoded with PIL when it is read, then
center-cropped and resized to 256x256, the host's part of the training augment (the random flip runs on
the device, in the train step). Each loader serves ``--steps`` consecutive global batches of ``--batch``
images after one untimed step (its start: the workers' spawn is reported apart), in ``--repeats`` rounds
over all loaders in turn (so that a shared machine's background load hits them alike), the median round
reported:

* ``threaded``: the loader before grain (kept here as the baseline): ``w`` threads read the batch's images
  ``prefetch`` steps ahead (0: in the caller's thread);
* ``grain``: ``BatchLoader`` with ``w`` grain worker processes (0: in the training process), prefetch 2.

What a training step consumes: XLA's FLOP count of one train step of ``configs/paper.py:lsun_church256``
(compiled here at batch ``--flops_batch``, not run) divided into an accelerator's sustained rate
(``--tflops``, default 300 TFLOP/s: about a third of an H100's dense bf16 peak) gives the images/s the
pipeline must feed one such device. That is an estimate, not a measurement.

    python benchmarks/input_pipeline.py [--images 256] [--batch 64] [--steps 6] [--workers 0,2,all]
        [--loaders threaded,grain] [--repeats 3] [--tflops 300] [--skip_flops] [--json PATH] [--smoke]

--smoke: 4 small JPEGs, batch 2, one step, 0 and 1 workers (grain: 0 only), the FLOPs of a tiny UNet's step: a
quick test.
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


class ThreadedLoader:
    """The loader before grain, as it was: ``workers`` threads read a step's images one by one (PIL's decoding
    releases the GIL), ``prefetch`` steps ahead of the one asked for; 0 workers read in the caller's thread."""

    def __init__(self, source, global_batch, seed, *, workers=0, prefetch=2):
        from concurrent.futures import ThreadPoolExecutor

        self.source, self.global_batch, self.seed, self.prefetch = source, global_batch, seed, prefetch
        self._pool = ThreadPoolExecutor(workers) if workers else None
        self._pending = {}

    def __call__(self, step):
        from ddim_jax.data import batch_indices

        rows = lambda s: batch_indices(len(self.source), self.global_batch, s, self.seed)  # noqa: E731
        if self._pool is None:
            return self.source.get(rows(step))
        for s in range(step, step + 1 + self.prefetch):
            if s not in self._pending:
                self._pending[s] = [self._pool.submit(self.source.get, [i]) for i in rows(s)]
        return np.concatenate([f.result() for f in self._pending.pop(step)])

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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
    from ddim_jax.parallel import BATCH_AXES, as_train_mesh, make_mesh
    from ddim_jax.training.run import build
    from ddim_jax.training.state import abstract_state, cached_train_step

    # --smoke: the tiny cifar10 step at batch 2 on the training mesh, the same program as memory_plan.py's,
    # op_profile.py's and train_step.py's (cached_train_step: one process compiles it once for all four)
    c = tiny_unet(get_config("cifar10")) if smoke else get_config("lsun_church256")
    c.training.batch_size = batch
    mesh = as_train_mesh(make_mesh(jax.devices()[:1]))
    rows = NamedSharding(mesh, P(None, BATCH_AXES))
    size = c.data.image_size
    images = jax.ShapeDtypeStruct((1, batch, size, size, 3), jnp.uint8, sharding=rows)
    labels = jax.ShapeDtypeStruct((1, batch), jnp.int32, sharding=rows)
    run = build(c)
    lowered = cached_train_step(run, mesh).lower(abstract_state(run, mesh), images, labels, {})
    cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) / batch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--size", default="320x384")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--workers", default="0,2,all")
    p.add_argument("--loaders", default="threaded,grain")
    p.add_argument("--repeats", type=int, default=3, help="rounds over the loaders; the median round is reported")
    p.add_argument("--tflops", type=float, default=300.0)
    p.add_argument("--flops_batch", type=int, default=4)
    p.add_argument("--skip_flops", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true", help="a few small JPEGs, one step, a tiny UNet: a quick test")
    a = p.parse_args(argv)
    if a.smoke:
        a.images, a.size, a.batch, a.steps, a.workers, a.flops_batch, a.repeats = 4, "64x64", 2, 1, "0,1", 2, 1
    return a


def main(argv=None):
    a = parse_args(argv)

    from ddim_jax.data import BatchLoader, FolderSource, process_batch, usable_cores

    height, width = map(int, a.size.split("x"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(tmp, a.images, height, width)
        source = FolderSource(tmp, 256, 3)
        print(f"{a.images} JPEGs of {height}x{width}, {sum(map(os.path.getsize, paths)) / len(paths) / 1024:.0f} KiB "
              f"each; global batch {a.batch}; {usable_cores()} usable cores; load average {os.getloadavg()[0]:.2f}; "
              f"checkout {git_revision()}")
        print("| loader | workers | images/s (median) | s per batch | start s | images/s of each round |")
        print("|---|---|---|---|---|---|")
        want = process_batch(source, a.batch, a.steps, 0, 0, 1)  # the last timed step, read directly
        configs = [(kind, w) for kind in a.loaders.split(",") for w in a.workers.split(",")]
        if a.smoke:  # grain's worker processes (seconds to start one) are tests/test_grain_input.py's to check
            configs = [c for c in configs if c != ("grain", "1")]
        times = {c: [] for c in configs}
        starts = {c: [] for c in configs}
        for _ in range(a.repeats):  # rounds over all loaders in turn, so that background load hits them alike
            for kind, w in configs:
                workers = usable_cores() if w == "all" else int(w)
                t0 = time.perf_counter()
                if kind == "grain":
                    loader = BatchLoader(source, a.batch, 0, workers=workers, prefetch=2)
                else:
                    loader = ThreadedLoader(source, a.batch, 0, workers=workers, prefetch=2)
                with loader as load:
                    load(0)
                    starts[kind, w].append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    for s in range(1, a.steps + 1):
                        batch = load(s)
                    times[kind, w].append(time.perf_counter() - t0)
                np.testing.assert_array_equal(batch, want)  # every loader serves the same batches
        for kind, w in configs:
            secs = float(np.median(times[kind, w]))
            ips = a.steps * a.batch / secs
            each = [a.steps * a.batch / t for t in times[kind, w]]
            rows.append({"loader": kind, "workers": w, "images_per_s": ips, "s_per_batch": secs / a.steps,
                         "start_s": float(np.median(starts[kind, w])), "images_per_s_each": each})
            workers = usable_cores() if w == "all" else int(w)
            print(f"| {kind} | {w} ({workers}) | {ips:.0f} | {secs / a.steps:.3f} | {np.median(starts[kind, w]):.1f} | "
                  f"{', '.join(f'{x:.0f}' for x in each)} |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    need = None
    if not a.skip_flops:
        per_image = step_flops_per_image(a.flops_batch, a.smoke)
        need = a.tflops * 1e12 / per_image
        print(f"lsun_church256 train step: {per_image / 1e9:.0f} GFLOP per image (XLA); at {a.tflops:.0f} TFLOP/s a "
              f"device consumes about {need:.0f} images/s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "images_per_s_needed": need, "tflops": a.tflops, "revision": git_revision(),
                       "load_average": os.getloadavg(),
                       "machine": machine_description()}, f, indent=1)


if __name__ == "__main__":
    main()
