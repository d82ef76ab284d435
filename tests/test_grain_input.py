"""The grain input pipeline (``ddim_jax.data.BatchLoader``): the batch of a step is the same whatever the
worker processes and hosts, a resumed loader continues the sequence exactly, and folders are read lazily.
The truth the loader is compared with is the order as documented (a stream of per-epoch permutations),
read from the source directly in this process."""

import multiprocessing

import numpy as np
import pytest
from PIL import Image

from ddim_jax import data as data_lib
from ddim_jax.config import base_config, validate_config

SEED, BATCH = 7, 6


def _folder(root, n=11, seed=0):
    """``n`` JPEG and PNG images of different sizes in two class sub-folders (n is prime: batches straddle epochs)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / ("cats" if i % 3 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        h, w = 10 + i % 4, 12 + i % 3
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        image.save(folder / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    return data_lib.load_folder(str(root), 8)


def _documented_order(n, global_batch, step, seed):
    """The global batch of ``step``: the ``step``-th run of ``global_batch`` in the stream of
    ``permutation(seed, e)``, e = 0, 1, ..."""
    stream = np.concatenate([np.random.default_rng([seed, e]).permutation(n)
                             for e in range((step + 1) * global_batch // n + 1)])
    return stream[step * global_batch:(step + 1) * global_batch]


def _truth(src, step, labelled, p=0, count=1):
    rows = _documented_order(len(src), BATCH, step, SEED)[p * BATCH // count:(p + 1) * BATCH // count]
    return (np.stack([src[i] for i in rows]), src.labels[rows]) if labelled else np.stack([src[i] for i in rows])


def _assert_same(a, b):
    for x, y in zip(*((a, b) if isinstance(a, tuple) else ((a,), (b,)))):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def test_the_order_is_the_documented_stream_of_permutations():
    for step in range(9):
        np.testing.assert_array_equal(data_lib.batch_indices(11, BATCH, step, SEED),
                                      _documented_order(11, BATCH, step, SEED))


def test_0_and_2_workers_give_the_same_batches_and_a_resumed_loader_continues(tmp_path):
    src = _folder(tmp_path)
    with data_lib.BatchLoader(src, BATCH, SEED, labelled=True, workers=0) as load:
        in_process = [load(s) for s in range(7)]
    for s, batch in enumerate(in_process):
        _assert_same(batch, _truth(src, s, labelled=True))
    # A run resumed at step 3 with 2 worker processes: the same steps 3..6 (across the epoch boundaries).
    with data_lib.BatchLoader(src, BATCH, SEED, labelled=True, workers=2, prefetch=3) as load:
        workers = [load(s) for s in range(3, 7)]
    for got, want in zip(workers, in_process[3:]):
        _assert_same(got, want)
    assert not multiprocessing.active_children()  # closing the loader stopped its workers


def test_per_host_shards_concatenated_are_the_one_host_batch(tmp_path):
    src = _folder(tmp_path)
    with data_lib.BatchLoader(src, BATCH, SEED) as one:
        whole = [one(s) for s in range(5)]
    halves = []
    for p in range(2):
        with data_lib.BatchLoader(src, BATCH, SEED, p, 2) as host:
            halves.append([host(s) for s in range(5)])
    for s in range(5):
        assert halves[0][s].shape == (BATCH // 2, 8, 8, 3)
        np.testing.assert_array_equal(np.concatenate([halves[0][s], halves[1][s]]), whole[s])
        np.testing.assert_array_equal(halves[1][s], _truth(src, s, False, 1, 2))


def test_a_loader_started_anywhere_continues_the_uninterrupted_sequence(tmp_path):
    src = _folder(tmp_path)
    with data_lib.BatchLoader(src, BATCH, SEED) as load:
        uninterrupted = [load(s) for s in range(8)]
    with data_lib.BatchLoader(src, BATCH, SEED) as load:  # stopped after step 2, resumed at 3; then a jump back
        got = {s: load(s) for s in (0, 1, 2)}
    with data_lib.BatchLoader(src, BATCH, SEED) as load:
        got.update({s: load(s) for s in (3, 4, 5, 6, 7)})
        np.testing.assert_array_equal(load(1), uninterrupted[1])
        np.testing.assert_array_equal(load(2), uninterrupted[2])
    for s in range(8):
        np.testing.assert_array_equal(got[s], uninterrupted[s])


def test_a_folder_is_not_read_before_its_images_are_asked_for(tmp_path, monkeypatch):
    _folder(tmp_path)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda path, *a, **k: (opened.append(str(path)), real_open(path, *a, **k))[1])
    src = data_lib.load_folder(str(tmp_path), 8)
    assert len(src) == 11 and src.num_classes == 2 and opened == []  # listed, not read
    with data_lib.BatchLoader(src, BATCH, SEED, workers=0) as load:
        assert opened == []
        load(0)
        assert sorted(opened) == sorted(src.files[i] for i in _documented_order(11, BATCH, 0, SEED))
        load(1)
    assert len(opened) == 2 * BATCH


def test_a_corrupt_image_fails_the_step_that_reads_it_with_a_one_line_error(tmp_path):
    src = _folder(tmp_path)
    bad = int(_documented_order(11, BATCH, 1, SEED)[1])  # the second image of step 1 (not in step 0: one epoch)
    with open(src.files[bad], "wb") as f:
        f.write(b"not an image" * 30)
    with data_lib.BatchLoader(src, BATCH, SEED) as load:
        assert load(0).shape == (BATCH, 8, 8, 3)
        with pytest.raises(ValueError, match=r"^data\.folder: cannot read image .*\(UnidentifiedImageError: ") as e:
            load(1)
    assert src.files[bad] in str(e.value) and "\n" not in str(e.value)


def test_digits_stay_in_memory_and_tfds_goes_through_grain(monkeypatch):
    digits = data_lib.make_source(base_config().data)
    with data_lib.BatchLoader(digits, 32, 0, labelled=True, workers=2) as load:  # in memory: no workers start
        _assert_same(load(4), data_lib.process_batch(digits, 32, 4, 0, 0, 1, labelled=True))
        assert load._iter is None and not multiprocessing.active_children()
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=10):
        src = data_lib.tfds_source("cifar10", "train", None, 8, "center")
        with data_lib.BatchLoader(src, 4, 0, labelled=True) as load:
            assert load(0) is not None and load._iter is not None  # read through grain
            for s in range(1, 4):
                _assert_same(load(s), data_lib.process_batch(src, 4, s, 0, 0, 1, labelled=True))


@pytest.mark.parametrize("value", [-2, True])
def test_num_workers_is_checked_with_a_one_line_error(value):
    c = base_config()
    c.data.num_workers = value
    what = r"an integer >= 0, or -1 \(the usable cores\)"
    with pytest.raises(ValueError, match=rf"^data\.num_workers must be {what}; got [^\n]*$"):
        validate_config(c)
