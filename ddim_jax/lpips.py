"""LPIPS (Zhang et al., CVPR 2018), VGG16 variant, as a Flax module, with weights read from local files.

The perceptual distance latent diffusion's autoencoders train with (LDM's and taming-transformers'
``LPIPS``, version 0.1, ``lpips=True``, not spatial), for images in [-1, 1]:

1. scale each image as LPIPS' ``ScalingLayer``: ``(x - shift) / scale`` per RGB channel
   (:data:`SHIFT`, :data:`SCALE`; a 1-channel image is repeated to RGB first);
2. run torchvision's VGG16 ``features`` (13 3x3 convs with ReLU, 2x2 max pools) and read the ReLU
   outputs ``relu1_2, relu2_2, relu3_3, relu4_3, relu5_3``;
3. at each of those layers ``l``, unit-normalise every position's feature vector over its channels
   (``f / (||f|| + 1e-10)``), square the difference of the two images', weight its channels by the
   layer's learned non-negative linear head ``w_l`` (a 1x1 conv to one channel, no bias) and average
   over positions;
4. sum the five layers: ``d(x, y) = sum_l mean_hw sum_c w_lc (f̂_l(x) - f̂_l(y))_hwc^2``, one number per
   image pair.

Nothing is shipped or downloaded. :func:`load_params` reads two local files:

* the VGG16 trunk: torchvision's ImageNet ``vgg16`` state dict (``vgg16-397923af.pth``; keys
  ``features.<i>.weight/bias``; ``classifier.*`` is ignored) or any file with those keys under a prefix
  (the ``lpips`` package's ``net.slice<k>.<i>.*`` layout is read too);
* the linear heads: the ``lpips`` package's ``weights/v0.1/vgg.pth`` (keys ``lin<l>.model.1.weight``,
  shape ``[1, C_l, 1, 1]``), as taming-transformers' ``vgg.pth``.

Each may be a PyTorch file (read with torch, needed only here) or a ``.safetensors`` file with the same
keys. Any layer missing or of the wrong shape is named in a one-line error.
"""

from __future__ import annotations

import hashlib
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax.state_dicts import read_state_dict

# LPIPS' ScalingLayer: ImageNet's mean/std expressed for inputs in [-1, 1].
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10  # LPIPS' normalize_tensor

# VGG16's convolutions, one tuple of output channels per block (a 2x2 max pool between blocks).
BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
CONVS = tuple(f"conv{b + 1}_{i + 1}" for b, block in enumerate(BLOCKS) for i in range(len(block)))
# Their indices in torchvision's ``vgg16().features`` (ReLUs and pools sit between them).
TORCHVISION_INDEX = dict(zip(CONVS, (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)))
FEATURE_CHANNELS = tuple(block[-1] for block in BLOCKS)  # channels of relu1_2 .. relu5_3
MIN_SIZE = 16  # relu5_3 is 1/16 of the input's side


def _normalize(f):
    """LPIPS' ``f / (||f||_channels + eps)``. The norm is taken as ``sqrt(sum f^2 + 1e-20)``: the same value
    to float32 precision, but a finite gradient at an all-zero feature vector (a ReLU layer's output can
    be 0 at every channel), where ``sqrt``'s derivative is infinite and the product would be NaN."""
    return f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True) + 1e-20) + EPS)


class VGG16Features(nn.Module):
    """``[N, H, W, 3]`` (ImageNet-normalised) -> the five ReLU outputs LPIPS compares."""

    @nn.compact
    def __call__(self, x):
        outs = []
        for b, block in enumerate(BLOCKS):
            if b:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            for i, ch in enumerate(block):
                x = nn.relu(nn.Conv(ch, (3, 3), padding=1, name=f"conv{b + 1}_{i + 1}")(x))
            outs.append(x)
        return outs


class LPIPS(nn.Module):
    """``(x, y)``: two ``[N, H, W, C]`` batches in [-1, 1] (``C`` 1 or 3, ``H, W >= 16``) -> ``[N]`` LPIPS
    distances. Params: ``{"vgg": VGG16Features params, "lin0".."lin4": {"kernel": [C_l]}}``."""

    @nn.compact
    def __call__(self, x, y):
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"LPIPS compares two [N, H, W, 1 or 3] batches of one shape; got {x.shape} and {y.shape}")
        if min(x.shape[1:3]) < MIN_SIZE:
            raise ValueError(f"LPIPS needs images of at least {MIN_SIZE}x{MIN_SIZE} (VGG16 pools them 4 times); "
                             f"got {x.shape[1]}x{x.shape[2]}")
        shift, scale = jnp.asarray(SHIFT, jnp.float32), jnp.asarray(SCALE, jnp.float32)
        vgg = VGG16Features(name="vgg")
        prep = lambda im: (jnp.broadcast_to(im, im.shape[:3] + (3,)) - shift) / scale  # noqa: E731
        fx, fy = vgg(prep(x)), vgg(prep(y))
        total = 0.0
        for i, (a, b) in enumerate(zip(fx, fy)):
            w = self.param(f"lin{i}", nn.initializers.ones, (a.shape[-1],))
            d = jnp.square(_normalize(a) - _normalize(b))
            total = total + jnp.mean(jnp.sum(d * w, axis=-1), axis=(1, 2))
        return total


def param_shapes() -> dict:
    """The params' shapes (``jax.ShapeDtypeStruct`` leaves), without allocating them."""
    z = jnp.zeros((1, MIN_SIZE, MIN_SIZE, 3), jnp.float32)
    return jax.eval_shape(lambda: LPIPS().init(jax.random.key(0), z, z))["params"]


# ----------------------------------------------------------------------------------------------
# Weights from local files.


def _read(path: str, what: str) -> dict:
    if not isinstance(path, str) or not path:
        raise ValueError(f"{what}: expected the path of a local weights file; got {path!r}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what}: {path!r} is a directory; name the weights file in it")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: {path!r} does not exist (LPIPS weights are not downloaded; see "
                                "ddim_jax.lpips for the files it reads)")
    return read_state_dict(path)[0]


_VGG_KEY = re.compile(r"(?:^|\.)(?:features|slice\d)\.(\d+)\.(weight|bias)$")
_HEAD_KEY = re.compile(r"(?:^|\.)lins?\.?(\d)\.model\.1\.weight$")


def convert_vgg16(state_dict, source: str = "the state dict") -> dict:
    """torchvision VGG16 ``features`` weights -> the ``vgg`` params (``[3, 3, in, out]`` kernels)."""
    found = {}
    for key, value in state_dict.items():
        m = _VGG_KEY.search(key)
        if m:
            found[(int(m.group(1)), m.group(2))] = np.asarray(value, np.float32)
    params, cin = {}, 3
    for name, ch in zip(CONVS, (c for block in BLOCKS for c in block)):
        i = TORCHVISION_INDEX[name]
        w, b = found.get((i, "weight")), found.get((i, "bias"))
        if w is None or b is None:
            raise ValueError(f"{source} has no VGG16 layer features.{i} ({name}); expected torchvision's vgg16 "
                             "state dict (keys features.<i>.weight/bias)")
        if w.shape != (ch, cin, 3, 3) or b.shape != (ch,):
            raise ValueError(f"{source}: features.{i} ({name}) has weight {w.shape} and bias {b.shape}; VGG16's are "
                             f"{(ch, cin, 3, 3)} and {(ch,)}")
        params[name] = {"kernel": np.transpose(w, (2, 3, 1, 0)), "bias": b}
        cin = ch
    return params


def convert_heads(state_dict, source: str = "the state dict") -> dict:
    """LPIPS' linear heads (``lin<l>.model.1.weight``, ``[1, C_l, 1, 1]``) -> ``{"lin<l>": [C_l]}``."""
    found = {}
    for key, value in state_dict.items():
        m = _HEAD_KEY.search(key)
        if m:
            found[int(m.group(1))] = np.asarray(value, np.float32)
    params = {}
    for i, ch in enumerate(FEATURE_CHANNELS):
        w = found.get(i)
        if w is None:
            raise ValueError(f"{source} has no LPIPS head lin{i}.model.1.weight; expected the lpips package's "
                             "weights/v0.1/vgg.pth")
        if w.shape != (1, ch, 1, 1):
            raise ValueError(f"{source}: lin{i}.model.1.weight has shape {w.shape}; LPIPS' VGG head {i} is "
                             f"{(1, ch, 1, 1)}")
        if not np.all(np.isfinite(w)):
            raise ValueError(f"{source}: lin{i}.model.1.weight is not finite")
        params[f"lin{i}"] = w.reshape(ch)
    return params


def load_params(vgg16: str, heads: str) -> dict:
    """LPIPS params from the VGG16 trunk's file and the linear heads' file (may be the same file)."""
    vgg = convert_vgg16(_read(vgg16, "VGG16 weights"), vgg16)
    if not all(np.all(np.isfinite(v)) for layer in vgg.values() for v in layer.values()):
        raise ValueError(f"{vgg16}: the VGG16 weights are not finite")
    return {"vgg": vgg, **convert_heads(_read(heads, "LPIPS heads"), heads)}


def files_digest(*paths: str) -> str:
    """sha256 over the files' bytes, in order: what a run records to notice its weights changing."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def distance(params, x, y):
    """LPIPS distances ``[N]`` between two batches of images in [-1, 1] (a convenience for notebooks)."""
    return LPIPS().apply({"params": params}, x, y)
