"""``data.classes``: a labelled dataset restricted to some of its classes (ddim_jax.data.ClassSubset), the same for
the digits, image folders and tfds, in every split; its checks are one-line errors naming the field."""

import numpy as np
import pytest
from helpers import tiny_config

from ddim_jax import data as data_lib
from ddim_jax.config import base_config, validate_config

LOW = (0, 1, 2, 3, 4)


def _data(dataset="digits", **fields):
    d = base_config().data
    d.update(dataset=dataset, **fields)
    return d


@pytest.mark.parametrize("split", ["train", "test"])
def test_the_digits_subset_is_numpy_s_filter_of_scikit_learn_s_digits(split):
    from sklearn.datasets import load_digits

    d = load_digits()  # the truth, read here: the first 1,500 digits train, the last 297 are held out
    part = slice(0, 1500) if split == "train" else slice(1500, None)
    images, labels = np.round(d.images[part] * (255.0 / 16.0)).astype(np.uint8), d.target[part]
    keep = np.isin(labels, LOW)
    src = data_lib.make_source(_data(split=split, classes=(4, 2, 0, 3, 1)))  # any order: a set of classes
    assert len(src) == keep.sum() and src.num_classes == 10
    got, got_labels = src.get_labelled(np.arange(len(src)))
    np.testing.assert_array_equal(got[..., 0], images[keep])
    np.testing.assert_array_equal(got_labels, labels[keep])  # the labels are not renumbered
    np.testing.assert_array_equal(src.get([5, 0]), got[[5, 0]])


def test_batches_hold_only_the_kept_classes_and_each_epoch_visits_every_kept_example():
    src = data_lib.make_source(_data(classes=(3, 7)))
    n = len(src)
    with data_lib.BatchLoader(src, 32, 0, labelled=True) as load:
        batches = [load(s) for s in range(2 * n // 32 + 1)]
    labels = np.concatenate([y for _, y in batches])
    assert set(labels.tolist()) == {3, 7}
    images = np.concatenate([x for x, _ in batches])[:n]  # the first epoch: a permutation of the subset
    want = src.get(np.arange(n))
    assert sorted(map(bytes, images)) == sorted(map(bytes, want))


def test_an_image_folder_s_subset_by_sub_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, count in [("cat", 3), ("dog", 2), ("eel", 4)]:
        (tmp_path / name).mkdir()
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    full = data_lib.make_source(_data("folder", folder=str(tmp_path), image_size=8, channels=3))
    src = data_lib.make_source(_data("folder", folder=str(tmp_path), image_size=8, channels=3, classes=(0, 2)))
    assert len(src) == 7 and src.decodes_on_read and src.class_names == ("cat", "dog", "eel")
    x, y = src.get_labelled(range(7))
    assert y.tolist() == [0, 0, 0, 2, 2, 2, 2]
    np.testing.assert_array_equal(x, full.get([0, 1, 2, 5, 6, 7, 8]))
    with data_lib.BatchLoader(src, 4, 1, labelled=True, workers=0) as load:  # read through grain, as training reads
        for s in range(3):
            got = load(s)
            want = data_lib.process_batch(src, 4, s, 1, 0, 1, labelled=True)
            np.testing.assert_array_equal(got[0], want[0])
            assert set(got[1].tolist()) <= {0, 2}
    with pytest.raises(ValueError, match=r"^data\.classes names class 3, but dataset 'folder:.*' has 3 classes "
                                         r"\(0\.\.2\)$"):
        data_lib.make_source(_data("folder", folder=str(tmp_path), image_size=8, channels=3, classes=(1, 3)))
    Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(tmp_path / "loose.png")  # no classes
    with pytest.raises(ValueError, match=r"^data\.classes=\[1\] needs class labels, and dataset 'folder:.*' has "
                                         r"none .*; set data\.classes=None$") as e:
        data_lib.make_source(_data("folder", folder=str(tmp_path), image_size=8, channels=3, classes=(1,)))
    assert "\n" not in str(e.value)


def test_a_tfds_subset_under_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=16):
        full = data_lib.make_source(_data("cifar10", image_size=8, channels=3, crop="none"))
        images, labels = full.get_labelled(range(len(full)))
        src = data_lib.make_source(_data("cifar10", image_size=8, channels=3, crop="none", classes=LOW))
        x, y = src.get_labelled(range(len(src)))
    keep = np.isin(labels, LOW)
    assert 0 < keep.sum() < 16  # (mock labels are random: both kinds are there)
    np.testing.assert_array_equal(y, labels[keep])
    np.testing.assert_array_equal(x, images[keep])


@pytest.mark.parametrize("classes, match", [
    ((), r"must be None \(every class\) or distinct class indices >= 0, e\.g\. \(0, 1, 2, 3, 4\); got \(\)"),
    ((1, 1), r"must be None .*; got \(1, 1\)"),
    ((-1, 2), r"must be None .*; got \(-1, 2\)"),
    ((0.0, 1), r"must be None .*; got \(0\.0, 1\)"),
    ((True,), r"must be None .*; got \(True,\)"),
    ((0, 10), r"names class 10, but dataset 'digits' has 10 classes \(0\.\.9\)"),
])
def test_bad_classes_are_one_line_errors_naming_the_field(classes, match):
    c = tiny_config()
    c.data.classes = classes
    with pytest.raises(ValueError, match=r"^data\.classes " + match + "$") as e:
        validate_config(c)
    assert "\n" not in str(e.value)


def test_a_config_with_classes_validates_and_keeps_them():
    c = tiny_config()
    c.data.classes = LOW
    validate_config(c)
    assert len(data_lib.make_source(c.data)) == int(np.isin(data_lib.load_digits("train")[1], LOW).sum())
