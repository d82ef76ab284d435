"""LoRA training: low-rank adapters on a frozen model's kernels (``training.lora``).

Each targeted kernel ``W`` (``[in, out]``, or ``[kh, kw, in, out]`` for a convolution) gets ``down`` (A, our
layout ``[in, r]`` or ``[kh, kw, in, r]``: a convolution with r output channels) and ``up`` (B, ``[r, out]``:
a 1x1 convolution), and the network runs on ``W + alpha / r * down @ up``. ``up`` starts at zero, so step 0 is
the base model exactly; ``down`` is uniform in ``+-1/sqrt(fan_in)`` (peft's default, Kaiming's with a = sqrt(5)).
The adapters mirror the params tree: a kernel at ``path/kernel`` has ``path/lora/down`` and ``path/lora/up``.

:class:`LoraObjective` wraps a diffusion objective: its trainable params are the adapters alone (the optimizer,
the EMA and the checkpoints hold nothing else), the base network's params are frozen (``frozen["base"]``, an
argument of the step like a latent model's autoencoder), and the loss is the wrapped objective's on the merged
params (a pure function of the base and the adapters). Its exported model is the merged one.

:func:`lora_state_dict` / :func:`save_lora` write the adapters as diffusers writes a LoRA
(``StableDiffusionLoraLoaderMixin.save_lora_weights``): peft's keys ``unet.<module>.lora_A.weight`` /
``.lora_B.weight`` in torch's layout, the module paths from the converters' table
(:data:`ddim_jax.convert.kinds.CONVERTERS`), and the adapter config (``r``, ``lora_alpha``, ``target_modules``)
as JSON in the file's ``lora_adapter_metadata``.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ddim_jax import files
from ddim_jax.config import LORA_TARGETS
from ddim_jax.convert.kinds import CONVERTERS, converter, network_spec
from ddim_jax.models import ModelSpec

LORA_FILE = "lora.safetensors"  # a LoRA run's adapters in diffusers' format, beside workdir/model
BASE_DIR = "lora_base"  # a LoRA run's copy of its frozen base model (its resume reads it)
METADATA_KEY = "lora_adapter_metadata"
_ATTENTION = ("to_q", "to_k", "to_v", "to_out_0")


def enabled(config) -> bool:
    """Whether a config trains low-rank adapters."""
    lo = config.training.get("lora")
    return lo is not None and lo.get("rank") is not None


def target_of(path: tuple, shape: tuple) -> str | None:
    """Which of :data:`ddim_jax.config.LORA_TARGETS` the kernel at ``path`` (its module's path, ``kernel`` last)
    is, or None (the time embedding's dense layers, the class embedding)."""
    names, last = path[:-2], path[-2]
    if last in _ATTENTION or (any("attn" in n for n in names) and last in ("q", "k", "v", "proj_out")):
        return "attention"
    if "ff" in names:
        return "feed_forward"
    if len(shape) == 4 and tuple(shape[:2]) != (1, 1):
        return "conv3x3"
    if len(shape) == 4 or last in ("nin_shortcut", "conv_shortcut", "proj_in", "proj_out"):
        return "conv1x1"
    return None


def adapted_paths(shapes, targets) -> dict[tuple, tuple]:
    """``{kernel path: shape}`` of the network's kernels (``shapes``: its param tree) the targets select."""
    flat = traverse_util.flatten_dict(shapes)
    return {p: tuple(s.shape) for p, s in sorted(flat.items())
            if p[-1] == "kernel" and target_of(p, tuple(s.shape)) in tuple(targets)}


def init_adapters(key, paths: dict, rank: int) -> dict:
    """Fresh adapters for the kernels ``paths`` (``{path: shape}``): ``down`` uniform, ``up`` zero."""
    flat = {}
    for i, (path, shape) in enumerate(paths.items()):
        *conv, cin, cout = shape
        fan_in = int(np.prod(conv, dtype=np.int64)) * cin
        bound = 1.0 / np.sqrt(fan_in)
        flat[(*path[:-1], "lora", "down")] = jax.random.uniform(jax.random.fold_in(key, i), (*conv, cin, rank),
                                                                jnp.float32, -bound, bound)
        flat[(*path[:-1], "lora", "up")] = jnp.zeros((rank, cout), jnp.float32)
    return traverse_util.unflatten_dict(flat)


def _pairs(adapters) -> dict[tuple, tuple]:
    """``{kernel path: (down, up)}`` of an adapters tree."""
    flat = traverse_util.flatten_dict(adapters)
    return {(*p[:-2], "kernel"): (flat[p], flat[(*p[:-1], "up")]) for p in flat if p[-1] == "down"}


def delta(down, up):
    """``down @ up`` in the kernel's layout (``[in, out]`` or ``[kh, kw, in, out]``)."""
    return jnp.einsum("...ir,ro->...io", down, up)


def merge(base, adapters, scaling: float):
    """``base`` with each adapted kernel replaced by ``W + scaling * down @ up`` (traceable; a new tree)."""
    flat = traverse_util.flatten_dict(base)
    for path, (down, up) in _pairs(adapters).items():
        w = flat[path]
        flat[path] = (w + scaling * delta(down, up)).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


def scaling(config) -> float:
    lo = config.training.lora
    return float(lo.alpha if lo.alpha is not None else lo.rank) / lo.rank


class LoraObjective:
    """A diffusion objective trained through low-rank adapters on its frozen base network (see the module's doc)."""

    def __init__(self, inner, config):
        lo = config.training.lora
        self.inner, self.spec, self.rank, self.targets = inner, inner.spec, int(lo.rank), tuple(lo.targets)
        self.alpha = float(lo.alpha if lo.alpha is not None else lo.rank)
        self.scaling = scaling(config)
        self.base_shapes = network_spec(self.spec).param_shapes()
        self.paths = adapted_paths(self.base_shapes, self.targets)
        if not self.paths:
            raise ValueError(f"training.lora.targets {list(self.targets)} select no kernel of this {self.spec.kind}; "
                             f"pick from {', '.join(LORA_TARGETS)}")

    def init(self, key) -> dict:
        return init_adapters(key, self.paths, self.rank)

    def frozen_shapes(self) -> dict:
        return dict(self.inner.frozen_shapes(), base=self.base_shapes)

    def merged(self, params, frozen):
        """The base network's params with the adapters merged."""
        return merge(frozen["base"], params, self.scaling)

    def model_params(self, params, frozen) -> dict:
        return self.inner.model_params(self.merged(params, frozen), {k: v for k, v in frozen.items() if k != "base"})

    def summary(self) -> str:
        n = sum(int(np.prod(s)) for p, s in self.paths.items())
        trainable = sum(int(np.prod(s[:-1])) * self.rank + self.rank * s[-1] for s in self.paths.values())
        return (f"{self.inner.summary()}; LoRA rank {self.rank}, alpha {self.alpha:g} on {len(self.paths)} kernels "
                f"({', '.join(self.targets)}): {trainable:,} trainable params beside {n:,} frozen in those kernels")

    def loss(self, params, frozen, *args):
        return self.inner.loss(self.merged(params, frozen), frozen, *args)

    def preview(self, params, mesh, source, n: int, config):
        return self.inner.preview(params, mesh, source, n, config)


def has_lora_format(spec: ModelSpec) -> bool:
    """Whether :func:`save_lora` can write a LoRA of ``spec``'s network (its kind has a diffusers counterpart)."""
    return spec.kind in CONVERTERS and CONVERTERS[spec.kind].library == "diffusers"


def lora_state_dict(spec: ModelSpec, adapters, alpha: float) -> tuple[dict[str, np.ndarray], dict]:
    """``(state_dict, adapter_metadata)`` of ``adapters`` (on ``spec``'s network) in diffusers' LoRA format: keys
    ``unet.<module>.lora_A.weight`` ``[r, in]`` (``[r, in, kh, kw]`` for a convolution, or a kernel the reference
    holds as a 1x1 convolution) and ``.lora_B.weight`` ``[out, r]`` (``[out, r, 1, 1]``), and the peft config
    diffusers packs under the ``unet.`` prefix. A kind without a diffusers counterpart raises ConversionError."""
    conv = converter(spec.kind)
    key = conv.key(network_spec(spec))
    out, modules, rank = {}, [], None
    for path, (down, up) in sorted(_pairs(adapters).items()):
        weight = key(path)
        module = weight[: -len(".weight")]
        down, up = np.asarray(down, np.float32), np.asarray(up, np.float32)
        rank = down.shape[-1]
        if down.ndim == 4:  # [kh, kw, in, r] -> [r, in, kh, kw]; B a 1x1 convolution
            a, b = down.transpose(3, 2, 0, 1), up.T[:, :, None, None]
        else:
            a, b = down.T, up.T
            if conv.pointwise(weight):
                a, b = a[:, :, None, None], b[:, :, None, None]
        out[f"unet.{module}.lora_A.weight"] = np.ascontiguousarray(a)
        out[f"unet.{module}.lora_B.weight"] = np.ascontiguousarray(b)
        modules.append(module)
    metadata = {"unet.r": int(rank), "unet.lora_alpha": float(alpha), "unet.target_modules": modules}
    return out, metadata


def save_lora(path: str, spec: ModelSpec, adapters, alpha: float) -> str:
    """Writes :func:`lora_state_dict` to the ``.safetensors`` file ``path`` (atomically); returns its path."""
    from safetensors.numpy import save_file

    state_dict, metadata = lora_state_dict(spec, adapters, alpha)
    bad = [k for k, v in state_dict.items() if not np.all(np.isfinite(v))]
    if bad:
        raise FloatingPointError(f"refusing to save non-finite LoRA weights ({bad[0]})")
    header = {"format": "pt", METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)}
    with files.atomic_path(os.fspath(path)) as tmp:
        save_file(state_dict, tmp, metadata=header)
    return os.path.abspath(os.fspath(path))
