"""Training data as random-access uint8 image sources, and the deterministic batch order.

Every source is a sequence of ``[H, W, C]`` uint8 images (``len(source)``, ``source.get(indices)``):

* ``digits``: scikit-learn's 1,797 real 8x8 handwritten digits, shipped inside scikit-learn (no
  download, no network): the embedded default.
* ``folder``: the PNG/JPEG images under a directory (recursively), center-cropped and resized.
* any tensorflow-datasets name (``cifar10``, ``celeb_a``, ``lsun/church_outdoor``, ...), read by
  random access through ``tfds.data_source`` from a prepared ``data_dir``.

The batch order is a pure function of (seed, step): epoch ``e`` visits the examples in the
permutation ``permutation(seed, e)``; the global batch of step ``s`` is the ``s``-th run of
``global_batch`` indices in that stream; process ``p`` of ``P`` loads rows ``[p * B / P, (p + 1) * B / P)``
of it. So the data position saved in a checkpoint is the step alone, a resumed run sees exactly the
batches an uninterrupted one would, and a run on 1 process and on 2 processes trains on the same
global batches. (``tfds.split_for_jax_process`` would instead give each process a fixed part of the
dataset, making the global batch depend on the process count.)
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class ArraySource:
    """Images held in memory, ``[N, H, W, C]`` uint8."""

    def __init__(self, images: np.ndarray, name: str):
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, H, W, C]; got {images.dtype} {images.shape}")
        self.images, self.name = images, name

    def __len__(self):
        return len(self.images)

    def get(self, indices) -> np.ndarray:
        return self.images[np.asarray(indices)]


class TfdsSource:
    """A tensorflow-datasets split read by random access, each image cropped and resized on load."""

    def __init__(self, name: str, split: str, data_dir: str | None, image_size: int, crop: str):
        import tensorflow_datasets as tfds

        try:
            self._ds = tfds.data_source(name, split=split, data_dir=data_dir)
        except Exception as e:  # tfds raises several types for "not prepared"; all mean the same here
            where = data_dir or "~/tensorflow_datasets"
            raise RuntimeError(
                f"dataset {name!r} (split {split!r}) is not prepared for random access in {where} ({type(e).__name__}). "
                f"Prepare it once with network access: pip install -e '.[data]' && "
                f"tfds build {name} --data_dir={where} --file_format=array_record") from None
        self.name, self.image_size, self.crop = name, image_size, crop

    def __len__(self):
        return len(self._ds)

    def get(self, indices) -> np.ndarray:
        return np.stack([prepare_image(self._ds[int(i)]["image"], self.image_size, self.crop) for i in indices])


def prepare_image(image: np.ndarray, size: int, crop: str = "center") -> np.ndarray:
    """uint8 ``[H, W, C]`` -> ``[size, size, C]``.

    ``crop``: ``"center"`` (central square, then resize; LSUN and image folders), ``"celeba"`` (the
    DDIM code's 128x128 face crop around (x, y) = (89, 121), then resize) or ``"none"`` (resize only).
    """
    from PIL import Image

    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    h, w = image.shape[:2]
    if crop == "celeba":
        cx, cy = 89, 121
        image = image[max(cy - 64, 0):cy + 64, max(cx - 64, 0):cx + 64]
    elif crop == "center":
        s = min(h, w)
        image = image[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    elif crop != "none":
        raise ValueError(f"crop must be one of 'center', 'celeba', 'none'; got {crop!r}")
    if image.shape[:2] != (size, size):
        channels = image.shape[2]
        pil = Image.fromarray(image[..., 0] if channels == 1 else image)
        image = np.asarray(pil.resize((size, size), Image.BICUBIC if size > min(image.shape[:2]) else Image.LANCZOS))
        image = image.reshape(size, size, channels)
    return image


DIGITS_TRAIN = 1500  # the first 1,500 digits train, the last 297 are held out


def load_digits(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits: (uint8 images ``[N, 8, 8, 1]``, values 0..16 scaled to 0..255; int32 labels).

    ``split``: ``"train"`` (the first 1,500), ``"test"`` (the last 297) or ``"all"``.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    parts = {"train": slice(0, DIGITS_TRAIN), "test": slice(DIGITS_TRAIN, None), "all": slice(None)}
    if split not in parts:
        raise ValueError(f"split must be one of 'train', 'test', 'all' for digits; got {split!r}")
    d = sk_load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images[parts[split]], d.target[parts[split]].astype(np.int32)


_IMAGE_MODES = {1: "L", 3: "RGB"}  # data.channels -> PIL mode


def _check_channels(channels) -> int:
    """``channels`` if it is the integer 1 or 3, else a one-line ValueError naming ``data.channels``."""
    if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or channels not in _IMAGE_MODES:
        raise ValueError(f"data.channels must be 1 (grey) or 3 (RGB); got {channels!r}")
    return int(channels)


def _read_image(path: pathlib.Path, mode: str) -> np.ndarray:
    """The image file at ``path`` in PIL ``mode``; an unreadable file is a one-line ValueError naming it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode))
    except Exception as e:  # UnidentifiedImageError, truncated data (OSError), broken chunks (SyntaxError), ...
        detail = (str(e).splitlines() or [""])[0]
        raise ValueError(f"data.folder: cannot read image {path} ({type(e).__name__}: {detail})") from None


def load_folder_images(path: str, image_size: int, channels: int = 3) -> np.ndarray:
    """All images under ``path`` (recursively, sorted by path), center-cropped and resized."""
    mode = _IMAGE_MODES[_check_channels(channels)]
    root = pathlib.Path(os.path.expanduser(path))
    if not root.is_dir():
        raise FileNotFoundError(f"data.folder: {str(root)!r} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"data.folder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {str(root)!r}")
    return np.stack([prepare_image(_read_image(f, mode), image_size) for f in files])


def make_source(data_config):
    """The source a ``config.data`` block names (``data.channels`` must be 1 or 3 for every kind)."""
    _check_channels(data_config.channels)
    name = data_config.dataset
    if name == "digits":
        return ArraySource(load_digits(data_config.get("split", "train"))[0], "digits")
    if name == "folder":
        return ArraySource(load_folder_images(data_config.folder, data_config.image_size, data_config.channels),
                           f"folder:{data_config.folder}")
    return TfdsSource(name, data_config.get("split", "train"), data_config.get("data_dir") or None,
                      data_config.image_size, data_config.get("crop", "center"))


def batch_indices(num_examples: int, global_batch: int, step: int, seed: int) -> np.ndarray:
    """Indices of the global batch of ``step``: a run of the stream of per-epoch permutations."""
    start = step * global_batch
    out = np.empty(global_batch, dtype=np.int64)
    filled = 0
    while filled < global_batch:
        epoch, offset = divmod(start + filled, num_examples)
        perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
        take = min(global_batch - filled, num_examples - offset)
        out[filled:filled + take] = perm[offset:offset + take]
        filled += take
    return out


def process_batch(source, global_batch: int, step: int, seed: int, process_index: int, process_count: int):
    """This process's rows of the global batch of ``step``, as uint8 ``[B / P, H, W, C]``."""
    idx = batch_indices(len(source), global_batch, step, seed)
    per = global_batch // process_count
    return source.get(idx[process_index * per:(process_index + 1) * per])
