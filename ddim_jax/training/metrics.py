"""What a run reports: ``metrics.jsonl``, TensorBoard scalars and a progress bar, written by process 0.

On resume, ``metrics.jsonl`` is cut back to the restored step first, so the steps run again after
the last checkpoint appear once.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from ddim_jax import files

log = logging.getLogger("ddim_jax")

METRICS = "metrics.jsonl"


def due(step: int, every: int, last_step: int) -> bool:
    """Whether something done every ``every`` steps (0 = never) is due after ``step``; always at the last step."""
    return step == last_step or (every > 0 and step % every == 0)


def truncate_metrics(path: str, step: int) -> int:
    """Drops the rows of ``metrics.jsonl`` after ``step``; returns the rows kept. The file is a log, so a
    line that is not a row (damaged bytes) is dropped with a warning naming it, and a torn last line
    (a run killed while writing it) silently."""
    if not os.path.exists(path):
        return 0
    kept = []
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError included
            if i < len(lines) or line.endswith(b"\n"):
                log.warning("%s line %d is not a JSON row (%r); dropped", path, i, line[:80])
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(json.dumps(row))
    files.write_text(path, "".join(x + "\n" for x in kept))
    return len(kept)


def _summary_writer():
    """tensorboardX's SummaryWriter class, imported without torch: where torch is installed, tensorboardX imports
    it (2 CPU-seconds of a run's start) only to accept torch tensors, which nothing here logs."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide and sys.modules.get("torch", ...) is None:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """jsonl + TensorBoard + tqdm for one run; a no-op on processes other than 0 (and the bar with
    ``progress=False``). The bar counts completed steps, not dispatched ones."""

    def __init__(self, workdir: str, *, start_step: int, total_steps: int, enabled: bool, progress: bool):
        from tqdm.auto import tqdm

        self.enabled = enabled
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not (enabled and progress), unit="step",
                        dynamic_ncols=True, desc="train")
        self._file = self._tb = None
        if enabled:
            path = os.path.join(workdir, METRICS)
            truncate_metrics(path, start_step)
            self._file = open(path, "a")
            self._tb = _summary_writer()(os.path.join(workdir, "tensorboard"))

    def completed(self, n: int):
        self.bar.update(n)

    def write(self, row: dict):
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", steps_s=f"{row['steps_per_sec']:.2f}")
        if not self.enabled:
            return
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for k, v in row.items():
            if k != "step":
                self._tb.add_scalar(k, v, row["step"])

    def close(self):
        self.bar.close()
        if self._file is not None:
            self._file.close()
            self._tb.close()
