"""The FID Inception-v3 as a Flax Linen module (NHWC), and its weight converter.

This is the network behind every published FID number (TensorFlow's ``inception-2015-12-05`` graph,
as ported to PyTorch by pytorch-fid in ``pt_inception-2015-12-05-6726825d.pth``). It differs from the
ImageNet Inception-v3 of torchvision in four places, all reproduced here:

* the ``Mixed_5b..5d`` (A), ``Mixed_6b..6e`` (C) and ``Mixed_7b`` (E_1) blocks average-pool their pool
  branch with padding excluded from the mean (TensorFlow's ``SAME`` average pool, torch's
  ``count_include_pad=False``);
* the last block ``Mixed_7c`` (E_2) max-pools its pool branch instead;
* its classifier has 1008 classes (unused: FID reads the 2048-d pooled features);
* the input, in [0, 1], is resized to 299x299 by plain bilinear interpolation (torch's
  ``F.interpolate(mode="bilinear", align_corners=False)``, no antialiasing, also when shrinking) and
  mapped to [-1, 1].

Every ``BasicConv2d`` (conv without bias, inference-mode BatchNorm with eps 1e-3, ReLU) is stored with
its BatchNorm folded into the convolution: ``kernel * gamma / sqrt(var + eps)`` and
``beta - mean * gamma / sqrt(var + eps)``, computed in float64 and kept in float32.

Weights are not downloaded: :func:`load_inception_params` reads a local copy of the pytorch-fid file.
"""

from __future__ import annotations

import os
import zipfile
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ddim_jax.cache import cache_dir

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_FILE
BN_EPS = 1e-3
INPUT_SIZE = 299
FEATURE_DIM = 2048


# ----------------------------------------------------------------------------------------------
# Preprocessing: torch-exact bilinear resize.


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``[out_size, in_size]`` interpolation matrix of torch's bilinear resize with align_corners=False.

    Source coordinate of output pixel ``i``: ``max((i + 0.5) * in / out - 0.5, 0)``; the two nearest
    input pixels are mixed linearly (the upper one clamped to the edge). No antialiasing filter, so
    shrinking an image samples it exactly as torch does (``jax.image.resize`` would antialias).
    """
    # Computed in float32 as torch's CPU kernel does (for float32 images): the source coordinate of a
    # far pixel carries float32 rounding (~3e-5 at 500 px), which float64 would not reproduce.
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    # torch's kernel evaluates scale * (i + 0.5) - 0.5 as one fused multiply-add (a single rounding);
    # the float64 product of two float32 numbers is exact, so this reproduces it.
    src = (np.float64(scale) * (np.arange(out_size, dtype=f32) + f32(0.5)).astype(np.float64) - 0.5).astype(f32)
    src = np.maximum(src, f32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = np.clip(src - i0.astype(f32), f32(0.0), f32(1.0))
    m = np.zeros((out_size, in_size), np.float64)
    np.add.at(m, (np.arange(out_size), i0), (f32(1.0) - lam).astype(np.float64))
    np.add.at(m, (np.arange(out_size), i1), lam.astype(np.float64))
    return m


def resize_bilinear(x: jnp.ndarray, size: int = INPUT_SIZE) -> jnp.ndarray:
    """``[N, H, W, C]`` float -> ``[N, size, size, C]``, torch ``F.interpolate`` bilinear semantics."""
    h, w = x.shape[1], x.shape[2]
    if (h, w) == (size, size):
        return x
    mh = jnp.asarray(bilinear_matrix(h, size), x.dtype)
    mw = jnp.asarray(bilinear_matrix(w, size), x.dtype)
    x = jnp.einsum("oh,nhwc->nowc", mh, x, precision="highest")
    return jnp.einsum("pw,nowc->nopc", mw, x, precision="highest")


# ----------------------------------------------------------------------------------------------
# The network.


def _pad(p) -> tuple:
    ph, pw = (p, p) if isinstance(p, int) else p
    return ((ph, ph), (pw, pw))


class ConvBN(nn.Module):
    """Conv2d with the inference BatchNorm folded in (so it has a bias), then ReLU."""

    features: int
    kernel_size: Sequence[int]
    strides: int = 1
    padding: int | tuple = 0

    @nn.compact
    def __call__(self, x):
        k = tuple(self.kernel_size) if not isinstance(self.kernel_size, int) else (self.kernel_size,) * 2
        x = nn.Conv(self.features, k, strides=(self.strides, self.strides), padding=_pad(self.padding),
                    use_bias=True, precision="highest", name="conv")(x)
        return nn.relu(x)


def _pool_branch(x, kind: str):
    if kind == "avg":  # TensorFlow SAME average pool: padded zeros are not counted.
        return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))  # pads with -inf, as torch


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = ConvBN(64, 1, name="branch1x1")(x)
        b5 = ConvBN(48, 1, name="branch5x5_1")(x)
        b5 = ConvBN(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = ConvBN(64, 1, name="branch3x3dbl_1")(x)
        b3 = ConvBN(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = ConvBN(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = ConvBN(self.pool_features, 1, name="branch_pool")(_pool_branch(x, "avg"))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = ConvBN(384, 3, strides=2, name="branch3x3")(x)
        bd = ConvBN(64, 1, name="branch3x3dbl_1")(x)
        bd = ConvBN(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = ConvBN(96, 3, strides=2, name="branch3x3dbl_3")(bd)
        bp = nn.max_pool(x, (3, 3), strides=(2, 2))
        return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = ConvBN(192, 1, name="branch1x1")(x)
        b7 = ConvBN(c7, 1, name="branch7x7_1")(x)
        b7 = ConvBN(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = ConvBN(c7, 1, name="branch7x7dbl_1")(x)
        bd = ConvBN(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = ConvBN(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = ConvBN(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = ConvBN(192, 1, name="branch_pool")(_pool_branch(x, "avg"))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = ConvBN(192, 1, name="branch3x3_1")(x)
        b3 = ConvBN(320, 3, strides=2, name="branch3x3_2")(b3)
        b7 = ConvBN(192, 1, name="branch7x7x3_1")(x)
        b7 = ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = ConvBN(192, 3, strides=2, name="branch7x7x3_4")(b7)
        bp = nn.max_pool(x, (3, 3), strides=(2, 2))
        return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nn.Module):
    pool: str  # "avg" (Mixed_7b, FIDInceptionE_1) or "max" (Mixed_7c, FIDInceptionE_2)

    @nn.compact
    def __call__(self, x):
        b1 = ConvBN(320, 1, name="branch1x1")(x)
        b3 = ConvBN(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate([ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = ConvBN(448, 1, name="branch3x3dbl_1")(x)
        bd = ConvBN(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        bp = ConvBN(192, 1, name="branch_pool")(_pool_branch(x, self.pool))
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """``[N, H, W, 3]`` images in [0, 1] -> ``[N, 2048]`` pool features (pytorch-fid's block 3).

    ``resize_input``/``normalize_input`` mirror pytorch-fid's ``InceptionV3`` flags (both on by default).
    """

    resize_input: bool = True
    normalize_input: bool = True

    @nn.compact
    def __call__(self, x):
        if self.resize_input:
            x = resize_bilinear(x, INPUT_SIZE)
        if self.normalize_input:
            x = 2.0 * x - 1.0
        x = ConvBN(32, 3, strides=2, name="Conv2d_1a_3x3")(x)
        x = ConvBN(32, 3, name="Conv2d_2a_3x3")(x)
        x = ConvBN(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2))
        x = ConvBN(80, 1, name="Conv2d_3b_1x1")(x)
        x = ConvBN(192, 3, name="Conv2d_4a_3x3")(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2))
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("avg", name="Mixed_7b")(x)
        x = InceptionE("max", name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


# ----------------------------------------------------------------------------------------------
# Conversion from the pytorch-fid state dict.

# pytorch-fid's InceptionV3 wrapper holds the same modules as nn.Sequential blocks, so its own
# state_dict names them "blocks.<i>.<j>"; these are the torchvision names they stand for.
_WRAPPER_NAMES = {
    "blocks.0.0": "Conv2d_1a_3x3", "blocks.0.1": "Conv2d_2a_3x3", "blocks.0.2": "Conv2d_2b_3x3",
    "blocks.1.0": "Conv2d_3b_1x1", "blocks.1.1": "Conv2d_4a_3x3",
    **{f"blocks.2.{i}": n for i, n in enumerate(
        ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"])},
    **{f"blocks.3.{i}": n for i, n in enumerate(["Mixed_7a", "Mixed_7b", "Mixed_7c"])},
}


def convert_state_dict(state_dict, source: str = "the state dict") -> dict:
    """pytorch-fid / torchvision Inception state dict (tensors or arrays) -> Flax ``params``.

    Accepts the keys of ``pt_inception-2015-12-05-6726825d.pth`` (``Mixed_5b.branch1x1.conv.weight``,
    ``...bn.running_var``; ``fc.*`` and ``AuxLogits.*`` are ignored) and those of pytorch-fid's
    ``InceptionV3`` wrapper (``blocks.2.0.branch1x1.conv.weight``). Each conv + BatchNorm pair becomes
    one folded ``{"kernel": [kh, kw, cin, cout], "bias": [cout]}``. A state dict that lacks a layer of
    the network, or holds one of another shape, is a one-line ValueError naming ``source``.
    """
    sd = {}
    for k, v in state_dict.items():
        v = v.detach().cpu().double().numpy() if hasattr(v, "detach") else np.asarray(v, np.float64)
        for prefix, name in _WRAPPER_NAMES.items():
            if k.startswith(prefix + "."):
                k = name + k[len(prefix):]
                break
        sd[k] = v

    layers = sorted({k[: -len(".conv.weight")] for k in sd if k.endswith(".conv.weight")})
    params: dict = {}
    for layer in layers:
        top = layer.split(".")[0]
        if top in ("AuxLogits", "fc"):
            continue
        names = ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")
        if not all(f"{layer}.{n}" in sd for n in names):
            continue  # reported as missing below
        w, gamma, beta, mean, var = (sd[f"{layer}.{n}"] for n in names)  # w: [cout, cin, kh, kw]
        scale = gamma / np.sqrt(var + BN_EPS)
        kernel = np.transpose(w, (2, 3, 1, 0)) * scale  # -> [kh, kw, cin, cout]
        bias = beta - mean * scale
        node = params
        for part in layer.split("."):
            node = node.setdefault(part, {})
        node["conv"] = {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}

    _check_params(params, source)
    return params


def _abstract_params():
    import jax

    return jax.eval_shape(lambda: FIDInceptionV3().init(jax.random.PRNGKey(0), jnp.zeros((1, 299, 299, 3))))["params"]


def _check_params(params: dict, source: str) -> None:
    """Every parameter of the network, in its shape, and nothing else: a wrong or truncated file fails
    loudly here, in one line naming ``source``."""
    want = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(_abstract_params()).items()}
    got = {"/".join(k): np.shape(v) for k, v in traverse_util.flatten_dict(params).items()}
    missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    if missing or extra:
        parts = ([f"lacks {len(missing)} of the {len(want)} Inception parameters (e.g. {missing[0]})"] if missing
                 else []) + ([f"has {len(extra)} unknown ones (e.g. {extra[0]})"] if extra else [])
        raise ValueError(f"{source} {' and '.join(parts)}; expected pytorch-fid's {FID_WEIGHTS_FILE}")
    wrong = [k for k in sorted(want) if got[k] != want[k]]
    if wrong:
        raise ValueError(f"{source}: {wrong[0]} has shape {got[wrong[0]]}; the FID Inception's is {want[wrong[0]]}")


def default_weights_path() -> str:
    """``$DDIM_JAX_INCEPTION_WEIGHTS``, else ``<cache dir>/pt_inception-2015-12-05-6726825d.pth``."""
    env = os.environ.get("DDIM_JAX_INCEPTION_WEIGHTS")
    if env:
        return os.path.expanduser(env)
    return os.path.join(cache_dir(), FID_WEIGHTS_FILE)


def load_inception_params(path: str | None = None) -> dict:
    """Flax params of the FID Inception from a local copy of pytorch-fid's weights file.

    ``path``: the ``.pth`` file (read with torch, needed only here), or an ``.npz`` written by
    :func:`save_inception_params` (no torch needed). Default: :func:`default_weights_path`.
    Nothing is downloaded.
    """
    path = os.path.expanduser(path) if path else default_weights_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"FID Inception weights not found at {path!r}: download {FID_WEIGHTS_FILE} (pytorch-fid's "
            f"FID weights) from {FID_WEIGHTS_URL} and pass its path or set DDIM_JAX_INCEPTION_WEIGHTS")
    what = f"FID Inception weights {path}"
    if path.endswith(".npz"):
        try:
            with np.load(path) as z:
                params = traverse_util.unflatten_dict({tuple(k.split("/")): z[k] for k in z.files})
        except (ValueError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{what}: not an .npz of save_inception_params ({type(e).__name__})") from None
        _check_params(params, what)
        return params
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"reading {path!r} needs torch (pip install torch); or convert it once elsewhere with "
            "ddim_jax.inception.save_inception_params and load the .npz") from None
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a file it cannot read
        raise ValueError(f"{what}: torch.load cannot read it ({type(e).__name__}); expected pytorch-fid's "
                         f"{FID_WEIGHTS_FILE}") from None
    if not isinstance(state_dict, dict):
        raise ValueError(f"{what}: holds a {type(state_dict).__name__}, not a state dict")
    return convert_state_dict(state_dict, what)


def save_inception_params(params: dict, path: str) -> None:
    """Write converted params as a flat ``.npz`` (keys ``Mixed_5b/branch1x1/conv/kernel``)."""
    flat = {}

    def walk(tree, prefix):
        for k, v in tree.items():
            if hasattr(v, "items"):
                walk(v, prefix + (k,))
            else:
                flat["/".join(prefix + (k,))] = np.asarray(v)

    walk(params, ())
    np.savez(path, **flat)
