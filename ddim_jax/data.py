"""Training data as random-access uint8 image sources, the deterministic batch order, and the loader.

Every source is a sequence of ``[H, W, C]`` uint8 images (``len(source)``, ``source.get(indices)``),
with class labels where the data has them (``source.num_classes``, ``source.get_labelled(indices)`` ->
``(images, int32 labels)``; ``num_classes`` is None for a source without labels):

* ``digits``: scikit-learn's 1,797 real 8x8 handwritten digits, shipped inside scikit-learn (no
  download, no network): the embedded default, held in memory. At another ``image_size`` they are
  upscaled (bicubic).
* ``folder``: the PNG/JPEG images under a directory (recursively; 16-bit PNGs scaled to 8 bits), read
  lazily: opening the source lists the files, and each image is decoded, center-cropped and resized
  when it is asked for, so a folder larger than memory trains. When every image lies inside a
  sub-folder of the directory, the sub-folders (sorted by name) are the classes, as image-folder
  loaders do: ``root/cat/1.png`` has the label of ``cat``.
* any tensorflow-datasets name (``cifar10``, ``celeb_a``, ``lsun/church_outdoor``, ...), read by
  random access through ``tfds.data_source`` from a prepared ``data_dir``; its ``label`` feature
  (when it has one, e.g. cifar10) gives the classes. Its images are decoded, cropped and resized as
  they are read.

``data.classes`` (:func:`make_source`) keeps the examples of a labelled source whose label is in a set of
classes, in the source's order, with their labels unchanged (:class:`ClassSubset`): the same for every
source kind and every split (a held-out split keeps the same classes). Training digits 0-4 only is
``data.classes = (0, 1, 2, 3, 4)``. A tfds source reads every record's label once when the subset opens.

The batch order is a pure function of (seed, step): epoch ``e`` visits the examples in the
permutation ``permutation(seed, e)``; the global batch of step ``s`` is the ``s``-th run of
``global_batch`` indices in that stream; process ``p`` of ``P`` loads rows ``[p * B / P, (p + 1) * B / P)``
of it. So the data position saved in a checkpoint is the step alone, a resumed run sees exactly the
batches an uninterrupted one would, and a run on 1 process and on 2 processes trains on the same
global batches. (``tfds.split_for_jax_process`` and grain's ``ShardOptions`` would instead give each
process a fixed part of the dataset, making the global batch depend on the process count.)

:class:`BatchLoader` serves a process's batches of consecutive steps through grain: the process's rows
of the order above, as a ``grain.MapDataset`` (element ``k`` is row ``k % (B / P)`` of step
``k // (B / P)``), mapped through the source's decoding and batched, read by ``workers`` grain worker
processes (which escape the GIL) or in the training process. Each batch is a function of its step
alone, so the workers only change when it is ready, never what it holds, and grain's iterator state
is the step: nothing beyond it is saved in a checkpoint.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import pathlib
import signal

import grain
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
    cropped and resized to ``image_size`` on load."""

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

    @property
    def labels(self) -> np.ndarray | None:
        """Every record's label (each record read once, then kept), or None without a label feature."""
        if self.num_classes is None:
            return None
        if getattr(self, "_labels", None) is None:
            self._labels = np.asarray([self.records[i]["label"] for i in range(len(self.records))], np.int32)
        return self._labels


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
    parts = {"train": slice(0, DIGITS_TRAIN), "test": slice(DIGITS_TRAIN, None), "all": slice(None)}
    if split not in parts:
        raise ValueError(f"split must be one of 'train', 'test', 'all' for digits; got {split!r}")
    pixels, target = _read_digits()
    images = np.round(pixels.reshape(-1, 8, 8, 1) * (255.0 / 16.0)).astype(np.uint8)
    return images[parts[split]], target[parts[split]].astype(np.int32)


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (pixels ``[1797, 64]`` in 0..16, labels), read from the file scikit-learn ships
    without importing scikit-learn, which costs every run on digits about a second; scikit-learn's own loader
    where that file is not where scikit-learn keeps it, or not the table it was."""
    spec = importlib.util.find_spec("sklearn")
    csv = pathlib.Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    table = np.loadtxt(csv, delimiter=",") if csv is not None and csv.is_file() else None
    if table is not None and table.shape == (1797, 65):  # 8x8 pixels and the label
        return table[:, :-1], table[:, -1].astype(np.int32)
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    return d.data, d.target


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


class FolderSource:
    """The images under a directory (recursively, sorted by path), decoded, center-cropped and resized when
    read (nothing is read when the source is opened); labelled by their top-level sub-folder when every
    image lies in one (``labels``, ``class_names``), else unlabelled (``num_classes`` None)."""

    decodes_on_read = True

    def __init__(self, path: str, image_size: int, channels: int = 3):
        self.mode = _IMAGE_MODES[_check_channels(channels)]
        root = pathlib.Path(os.path.expanduser(path))
        if not root.is_dir():
            raise FileNotFoundError(f"data.folder: {str(root)!r} is not a directory")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise FileNotFoundError(f"data.folder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {str(root)!r}")
        self.name, self.image_size, self.files = f"folder:{path}", image_size, [str(f) for f in files]
        parts = [f.relative_to(root).parts for f in files]
        if any(len(p) < 2 for p in parts):  # an image directly under the root: no classes
            self.labels, self.class_names, self.num_classes = None, None, None
        else:
            self.class_names = tuple(sorted({p[0] for p in parts}))
            index = {n: i for i, n in enumerate(self.class_names)}
            self.labels = np.array([index[p[0]] for p in parts], np.int32)
            self.num_classes = len(self.class_names)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i) -> np.ndarray:
        return prepare_image(_read_image(pathlib.Path(self.files[int(i)]), self.mode), self.image_size)

    def get(self, indices) -> np.ndarray:
        return np.stack([self[i] for i in np.asarray(indices).reshape(-1)])

    def get_labelled(self, indices) -> tuple[np.ndarray, np.ndarray]:
        if self.labels is None:
            raise ValueError(f"dataset {self.name!r} has no class labels")
        idx = np.asarray(indices).reshape(-1)
        return self.get(idx), self.labels[idx]


def load_folder(path: str, image_size: int, channels: int = 3) -> FolderSource:
    """The images under ``path`` as a :class:`FolderSource` (read lazily)."""
    return FolderSource(path, image_size, channels)


def load_folder_images(path: str, image_size: int, channels: int = 3) -> np.ndarray:
    """All images under ``path`` (recursively, sorted by path), center-cropped and resized, read now:
    for small folders (previews, tests); training reads a folder through :class:`FolderSource`."""
    src = load_folder(path, image_size, channels)
    return src.get(range(len(src)))


class ClassSubset:
    """The examples of a labelled ``source`` whose label is in ``classes``, in the source's order, with their
    labels (and ``num_classes``, ``class_names``) unchanged: index ``i`` is the source's ``indices[i]``.
    A one-line ValueError naming ``data.classes`` for a source without labels, a class it does not have, or
    classes with no example in it."""

    def __init__(self, source, classes):
        classes = check_classes(classes)
        labels = getattr(source, "labels", None)
        if source.num_classes is None or labels is None:
            raise ValueError(f"data.classes={list(classes)} needs class labels, and dataset {source.name!r} has none "
                             "(a folder dataset is labelled by its sub-folders); set data.classes=None")
        bad = [k for k in classes if k >= source.num_classes]
        if bad:
            raise ValueError(f"data.classes names class {bad[0]}, but dataset {source.name!r} has "
                             f"{source.num_classes} classes (0..{source.num_classes - 1})")
        self.source, self.classes = source, classes
        self.indices = np.flatnonzero(np.isin(np.asarray(labels), classes))
        if not len(self.indices):
            raise ValueError(f"data.classes={list(classes)}: dataset {source.name!r} has no example of these classes")
        self.labels = np.asarray(labels, np.int32)[self.indices]
        self.name = f"{source.name}[classes {','.join(map(str, classes))}]"
        self.num_classes, self.class_names = source.num_classes, source.class_names
        self.decodes_on_read = getattr(source, "decodes_on_read", False)

    def __len__(self):
        return len(self.indices)

    def get(self, indices) -> np.ndarray:
        return self.source.get(self.indices[np.asarray(indices, np.int64).reshape(-1)])

    def get_labelled(self, indices) -> tuple[np.ndarray, np.ndarray]:
        return self.source.get_labelled(self.indices[np.asarray(indices, np.int64).reshape(-1)])


def check_classes(classes) -> tuple[int, ...]:
    """``data.classes`` as a sorted tuple of ints: a non-empty list of distinct integers >= 0, else a one-line
    ValueError naming the field."""
    ok = (isinstance(classes, (tuple, list)) and len(classes) > 0
          and all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 0 for k in classes)
          and len(set(int(k) for k in classes)) == len(classes))
    if not ok:
        raise ValueError(f"data.classes must be None (every class) or distinct class indices >= 0, e.g. (0, 1, 2, 3, "
                         f"4); got {classes!r}")
    return tuple(sorted(int(k) for k in classes))


def make_source(data_config):
    """The source a ``config.data`` block names (``data.channels`` must be 1 or 3 for every kind), restricted
    to ``data.classes`` when it is set (:class:`ClassSubset`)."""
    source = _make_source(data_config)
    classes = data_config.get("classes")
    return source if classes is None else ClassSubset(source, classes)


def _make_source(data_config):
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


@functools.lru_cache(maxsize=4)
def _permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The order of ``epoch``'s examples (cached: a loader reads each epoch's one image at a time)."""
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    perm.setflags(write=False)
    return perm


def batch_indices(num_examples: int, global_batch: int, step: int, seed: int) -> np.ndarray:
    """Indices of the global batch of ``step``: a run of the stream of per-epoch permutations."""
    start = step * global_batch
    out = np.empty(global_batch, dtype=np.int64)
    filled = 0
    while filled < global_batch:
        epoch, offset = divmod(start + filled, num_examples)
        perm = _permutation(num_examples, seed, epoch)
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


class _ProcessRows:
    """The indices a process reads, one element per image: element ``k`` is row ``k % per`` of this
    process's rows of the global batch of step ``k // per`` (a grain random-access data source)."""

    def __init__(self, num_examples: int, global_batch: int, seed: int, process_index: int, process_count: int):
        self.n, self.global_batch, self.seed = num_examples, global_batch, seed
        self.per = global_batch // process_count
        self.first = process_index * self.per

    def __len__(self):
        return 2 ** 62  # the stream of epochs does not end; the loader stops asking

    def __getitem__(self, k) -> int:
        step, row = divmod(int(k), self.per)
        i = step * self.global_batch + self.first + row  # its position in the stream of epochs
        epoch, offset = divmod(i, self.n)
        return int(_permutation(self.n, self.seed, epoch)[offset])


class _Read(grain.transforms.Map):
    """Index -> the source's image (and label): the decoding, run by grain's workers."""

    def __init__(self, source, labelled: bool):
        self.source, self.labelled = source, labelled

    def map(self, i):
        if self.labelled:
            x, y = self.source.get_labelled([i])
            return x[0], y[0]
        return self.source.get([i])[0]


def _ignore_interrupts(worker_index: int, worker_count: int) -> None:
    """In a grain worker: Ctrl-C is the training process's to act on (it saves a checkpoint, then stops the
    workers); a worker that died of it would fail the steps read until then."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class BatchLoader:
    """This process's batches of consecutive steps, exactly as :func:`process_batch` gives them.

    A source that decodes on read (a :class:`FolderSource`, a :class:`RecordSource`: tfds) is read by a
    grain pipeline over :class:`_ProcessRows`: ``workers`` worker processes each build whole batches, image
    after image, about ``prefetch`` steps ahead of the one asked for; with 0 workers the calling process
    reads each batch when it is asked for. Every batch is a function of its step, so it is the same
    whatever the workers. In-memory sources are indexed in the caller's thread. Steps are asked for in
    order; another step (a resumed run) starts the pipeline over at that step.
    """

    def __init__(self, source, global_batch: int, seed: int, process_index: int = 0, process_count: int = 1, *,
                 labelled: bool = False, workers: int = 0, prefetch: int = 2):
        self.source, self.labelled = source, labelled
        self.workers, self.prefetch = int(workers), max(int(prefetch), 0)
        self._args = (global_batch, seed, process_index, process_count)
        self._grain = getattr(source, "decodes_on_read", False)
        self._iter, self._next = None, None

    def dataset(self, start: int = 0) -> "grain.MapDataset":
        """The process's batches from step ``start`` on, as a grain ``MapDataset`` (element ``j``: step
        ``start + j``)."""
        global_batch, seed, p, count = self._args
        per = global_batch // count
        rows = grain.MapDataset.source(_ProcessRows(len(self.source), global_batch, seed, p, count))
        images = rows.slice(slice(start * per, None)).map(_Read(self.source, self.labelled))
        return images.batch(per, drop_remainder=True)

    def _start(self, step: int):
        self.close()
        # One image after another in each process: the worker processes are the parallelism (grain's reading
        # threads on top of them were slower, benchmarks/RESULTS_accelerators.md).
        ds = self.dataset(step).to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        if self.workers > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain reads its flags in multiprocess mode: their defaults here
                flags.FLAGS.mark_as_parsed()
            buffer = max(1, math.ceil(self.prefetch / self.workers))
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers, per_worker_buffer_size=buffer),
                                worker_init_fn=_ignore_interrupts)
        self._iter = iter(ds)

    def __call__(self, step: int):
        if not self._grain:
            global_batch, seed, p, count = self._args
            return process_batch(self.source, global_batch, step, seed, p, count, labelled=self.labelled)
        if self._iter is None or step != self._next:
            self._start(step)
        batch = next(self._iter)
        self._next = step + 1
        # Plain arrays: a worker's batch arrives in shared memory, freed as soon as it is copied out.
        return (np.array(batch[0]), np.array(batch[1])) if self.labelled else np.array(batch)

    def close(self):
        it, self._iter = self._iter, None
        if it is not None and hasattr(it, "close"):
            it.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
