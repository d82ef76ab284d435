"""Training data as random-access uint8 image sources, and the deterministic batch order.

Every source is a sequence of ``[H, W, C]`` uint8 images (``len(source)``, ``source.get(indices)``),
with class labels where the data has them (``source.num_classes``, ``source.get_labelled(indices)`` ->
``(images, int32 labels)``; ``num_classes`` is None for a source without labels):

* ``digits``: scikit-learn's 1,797 real 8x8 handwritten digits, shipped inside scikit-learn (no
  download, no network): the embedded default. At another ``image_size`` they are upscaled (bicubic).
* ``folder``: the PNG/JPEG images under a directory (recursively; 16-bit PNGs scaled to 8 bits),
  center-cropped and resized. When every image lies inside a sub-folder of the directory, the
  sub-folders (sorted by name) are the classes, as image-folder loaders do: ``root/cat/1.png`` has
  the label of ``cat``.
* any tensorflow-datasets name (``cifar10``, ``celeb_a``, ``lsun/church_outdoor``, ...), read by
  random access through ``tfds.data_source`` from a prepared ``data_dir``; its ``label`` feature
  (when it has one, e.g. cifar10) gives the classes. Its images are decoded, cropped and resized as
  they are read, by :class:`BatchLoader`'s worker threads ahead of the training step.

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
    """Images held in memory, ``[N, H, W, C]`` uint8, with optional labels ``[N]`` in ``[0, num_classes)``."""

    def __init__(self, images: np.ndarray, name: str, labels: np.ndarray | None = None,
                 class_names: tuple[str, ...] | None = None):
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, H, W, C]; got {images.dtype} {images.shape}")
        self.images, self.name = images, name
        self.labels = None if labels is None else np.asarray(labels, np.int32)
        if self.labels is not None and self.labels.shape != (len(images),):
            raise ValueError(f"labels must have shape [{len(images)}]; got {self.labels.shape}")
        if self.labels is not None and class_names is None:
            class_names = tuple(str(i) for i in range(int(self.labels.max(initial=-1)) + 1))
        self.class_names = class_names
        self.num_classes = None if self.labels is None else len(class_names)

    def __len__(self):
        return len(self.images)

    def get(self, indices) -> np.ndarray:
        return self.images[np.asarray(indices)]

    def get_labelled(self, indices) -> tuple[np.ndarray, np.ndarray]:
        if self.labels is None:
            raise ValueError(f"dataset {self.name!r} has no class labels")
        idx = np.asarray(indices)
        return self.images[idx], self.labels[idx]


class RecordSource:
    """Records read by random access and decoded on read: ``records[i]`` is a dict with an ``"image"``
    (uint8 ``[H, W, C]`` or ``[H, W]``) and, when ``num_classes`` is given, a ``"label"``; each image is
    cropped and resized to ``image_size`` on load. The training loop reads such a source through
    :class:`BatchLoader`'s worker threads."""

    decodes_on_read = True

    def __init__(self, records, name: str, image_size: int, crop: str, class_names: tuple[str, ...] | None = None):
        self.records, self.name, self.image_size, self.crop = records, name, image_size, crop
        self.class_names = class_names
        self.num_classes = None if class_names is None else len(class_names)

    def __len__(self):
        return len(self.records)

    def get(self, indices) -> np.ndarray:
        return np.stack([prepare_image(self.records[int(i)]["image"], self.image_size, self.crop) for i in indices])

    def get_labelled(self, indices) -> tuple[np.ndarray, np.ndarray]:
        if self.num_classes is None:
            raise ValueError(f"dataset {self.name!r} has no class label feature")
        records = [self.records[int(i)] for i in indices]
        return (np.stack([prepare_image(r["image"], self.image_size, self.crop) for r in records]),
                np.asarray([r["label"] for r in records], np.int32))


def tfds_source(name: str, split: str, data_dir: str | None, image_size: int, crop: str) -> RecordSource:
    """A tensorflow-datasets split read by random access (``tfds.data_source``); its ``label`` feature, when
    it has one (e.g. cifar10), gives the classes."""
    import tensorflow_datasets as tfds

    try:
        ds = tfds.data_source(name, split=split, data_dir=data_dir)
    except Exception as e:  # tfds raises several types for "not prepared"; all mean the same here
        where = data_dir or "~/tensorflow_datasets"
        raise RuntimeError(
            f"dataset {name!r} (split {split!r}) is not prepared for random access in {where} ({type(e).__name__}). "
            f"Prepare it once with network access: pip install -e '.[data]' && "
            f"tfds build {name} --data_dir={where} --file_format=array_record") from None
    features = getattr(getattr(ds, "dataset_info", None), "features", None)
    label = features["label"] if features is not None and "label" in features else None
    names = tuple(label.names) if getattr(label, "num_classes", None) is not None else None  # a ClassLabel feature
    return RecordSource(ds, name, image_size, crop, names)


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
            if not im.mode.startswith("I"):
                return np.asarray(im.convert(mode))
            wide = np.asarray(im, np.int64)  # 16-bit grey (0..65535): PIL's convert would clip it at 255
    except Exception as e:  # UnidentifiedImageError, truncated data (OSError), broken chunks (SyntaxError), ...
        detail = (str(e).splitlines() or [""])[0]
        raise ValueError(f"data.folder: cannot read image {path} ({type(e).__name__}: {detail})") from None
    return np.asarray(Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8)).convert(mode))


def load_folder(path: str, image_size: int, channels: int = 3) -> ArraySource:
    """All images under ``path`` (recursively, sorted by path), center-cropped and resized; labelled by
    their top-level sub-folder when every image lies in one (else unlabelled)."""
    mode = _IMAGE_MODES[_check_channels(channels)]
    root = pathlib.Path(os.path.expanduser(path))
    if not root.is_dir():
        raise FileNotFoundError(f"data.folder: {str(root)!r} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"data.folder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {str(root)!r}")
    images = np.stack([prepare_image(_read_image(f, mode), image_size) for f in files])
    parts = [f.relative_to(root).parts for f in files]
    if any(len(p) < 2 for p in parts):  # an image directly under the root: no classes
        return ArraySource(images, f"folder:{path}")
    names = tuple(sorted({p[0] for p in parts}))
    index = {n: i for i, n in enumerate(names)}
    return ArraySource(images, f"folder:{path}", np.array([index[p[0]] for p in parts], np.int32), names)


def load_folder_images(path: str, image_size: int, channels: int = 3) -> np.ndarray:
    """All images under ``path`` (recursively, sorted by path), center-cropped and resized."""
    return load_folder(path, image_size, channels).images


def make_source(data_config):
    """The source a ``config.data`` block names (``data.channels`` must be 1 or 3 for every kind)."""
    _check_channels(data_config.channels)
    name = data_config.dataset
    if name == "digits":
        images, labels = load_digits(data_config.get("split", "train"))
        size = data_config.get("image_size", 8)
        if size != images.shape[1]:  # upscaled (bicubic), e.g. to 32x32 for an f = 4 autoencoder
            images = np.stack([prepare_image(im, size, "none") for im in images])
        return ArraySource(images, "digits", labels, tuple(map(str, range(10))))
    if name == "folder":
        return load_folder(data_config.folder, data_config.image_size, data_config.channels)
    return tfds_source(name, data_config.get("split", "train"), data_config.get("data_dir") or None,
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


def process_batch(source, global_batch: int, step: int, seed: int, process_index: int, process_count: int,
                  labelled: bool = False):
    """This process's rows of the global batch of ``step``, as uint8 ``[B / P, H, W, C]`` (and, with
    ``labelled``, their int32 labels ``[B / P]``)."""
    idx = batch_indices(len(source), global_batch, step, seed)
    per = global_batch // process_count
    rows = idx[process_index * per:(process_index + 1) * per]
    return source.get_labelled(rows) if labelled else source.get(rows)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class BatchLoader:
    """This process's batches of consecutive steps, as :func:`process_batch` gives them, loaded ahead.

    A source that decodes on read (:class:`RecordSource`: tfds, and any records) is read image by image
    by ``workers`` threads (JPEG/PNG decoding and resizing release the GIL), ``prefetch`` steps ahead of
    the one asked for; the threads only fill slots of batches whose indices are fixed in advance, so the
    batches are exactly :func:`process_batch`'s whatever the number of workers. In-memory sources, and
    ``workers=0``, load in the caller's thread. Steps must be asked for in order (a jump starts over).
    """

    def __init__(self, source, global_batch: int, seed: int, process_index: int = 0, process_count: int = 1, *,
                 labelled: bool = False, workers: int = 0, prefetch: int = 2):
        self.source, self.labelled, self.prefetch = source, labelled, max(int(prefetch), 0)
        self._args = (global_batch, seed, process_index, process_count)
        self._pool = None
        if workers and getattr(source, "decodes_on_read", False):
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(workers, thread_name_prefix="ddim_jax-data")
        self._pending: dict[int, list] = {}  # step -> one future per image

    def _rows(self, step: int) -> np.ndarray:
        global_batch, seed, p, count = self._args
        per = global_batch // count
        return batch_indices(len(self.source), global_batch, step, seed)[p * per:(p + 1) * per]

    def _read_one(self, i):
        return self.source.get_labelled([i]) if self.labelled else self.source.get([i])

    def __call__(self, step: int):
        if self._pool is None:
            global_batch, seed, p, count = self._args
            return process_batch(self.source, global_batch, step, seed, p, count, labelled=self.labelled)
        if step not in self._pending:
            self._cancel()
        for s in range(step, step + 1 + self.prefetch):
            if s not in self._pending:
                self._pending[s] = [self._pool.submit(self._read_one, i) for i in self._rows(s)]
        parts = [f.result() for f in self._pending.pop(step)]
        if self.labelled:
            return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])
        return np.concatenate(parts)

    def _cancel(self):
        for futures in self._pending.values():
            for f in futures:
                f.cancel()
        self._pending.clear()

    def close(self):
        if self._pool is not None:
            self._cancel()
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
