"""Image-folder datasets and ``config.data`` validation: unreadable files and bad channel counts are
one-line errors naming the file or the field."""

import numpy as np
import pytest

from ddim_jax import data as data_lib
from ddim_jax.config import base_config


def _write_pngs(folder, sizes, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"im{i}.png")


def _data_config(dataset="digits", **overrides):
    d = base_config().data
    d.update(dataset=dataset, **overrides)
    return d


def test_folder_images_in_grayscale_and_rgb(tmp_path):
    _write_pngs(tmp_path, [(12, 10), (6, 6)])
    rgb = data_lib.load_folder_images(str(tmp_path), 4, channels=3)
    gray = data_lib.load_folder_images(str(tmp_path), 4, channels=1)
    assert rgb.shape == (2, 4, 4, 3) and gray.shape == (2, 4, 4, 1)
    assert rgb.dtype == gray.dtype == np.uint8
    src = data_lib.make_source(_data_config("folder", folder=str(tmp_path), image_size=4, channels=1))
    np.testing.assert_array_equal(src.get([0, 1]), gray)


def _assert_one_line(error: pytest.ExceptionInfo) -> None:
    assert "\n" not in str(error.value)
    assert error.value.__cause__ is None and error.value.__suppress_context__  # no PIL traceback attached


def test_a_corrupt_image_is_a_one_line_error_naming_the_file(tmp_path):
    _write_pngs(tmp_path, [(8, 8), (8, 8)])
    bad = tmp_path / "sub" / "bad.png"
    bad.parent.mkdir()
    bad.write_bytes(np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match=r"^data\.folder: cannot read image .*bad\.png \(UnidentifiedImageError: ") as e:
        data_lib.load_folder_images(str(tmp_path), 4)
    assert str(bad) in str(e.value)
    _assert_one_line(e)


def test_a_truncated_image_is_a_one_line_error_naming_the_file(tmp_path):
    _write_pngs(tmp_path, [(32, 32)])
    good = (tmp_path / "im0.png").read_bytes()
    (tmp_path / "im0.png").write_bytes(good[:len(good) // 2])  # a valid header, half the pixel data
    with pytest.raises(ValueError, match=r"^data\.folder: cannot read image .*im0\.png \(") as e:
        data_lib.load_folder_images(str(tmp_path), 4)
    _assert_one_line(e)


@pytest.mark.parametrize("channels", [2, 0, 4, 3.0, True])
def test_folder_channels_other_than_1_or_3_is_a_one_line_error(tmp_path, channels):
    _write_pngs(tmp_path, [(8, 8)])
    with pytest.raises(ValueError, match=r"^data\.channels must be 1 .* or 3 .*; got ") as e:
        data_lib.load_folder_images(str(tmp_path), 4, channels=channels)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("dataset", ["digits", "folder", "cifar10"])
def test_make_source_rejects_channels_other_than_1_or_3_for_every_dataset_kind(tmp_path, dataset):
    _write_pngs(tmp_path, [(8, 8)])
    c = _data_config(dataset, folder=str(tmp_path), image_size=8, channels=2)
    with pytest.raises(ValueError, match=r"^data\.channels must be 1 .* or 3 .*; got 2$"):
        data_lib.make_source(c)  # checked before any data is read (no tfds needed for cifar10)


def test_make_source_digits_with_valid_channels():
    src = data_lib.make_source(_data_config("digits", channels=1))
    assert len(src) == data_lib.DIGITS_TRAIN and src.get([0]).shape == (1, 8, 8, 1)
