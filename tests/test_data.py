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
    with pytest.raises(ValueError, match=r"^data\.folder: cannot read image .*bad\.png \(UnidentifiedImageError: ") \
            as e:
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


def test_16_bit_pngs_are_scaled_to_8_bits_not_clipped(tmp_path):
    from PIL import Image

    gradient = np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)
    im = Image.fromarray(gradient)
    assert im.mode == "I;16"
    im.save(tmp_path / "deep.png")
    want = np.round(gradient / 257.0)  # 65535 / 255 = 257
    for channels in (1, 3):
        got = data_lib.load_folder_images(str(tmp_path), 16, channels=channels)
        assert got.shape == (1, 16, 16, channels) and got.dtype == np.uint8
        np.testing.assert_allclose(got[0], np.repeat(want[..., None], channels, -1), atol=1)


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


@pytest.mark.parametrize("split, part", [("train", slice(0, 1500)), ("test", slice(1500, None)), ("all", slice(None))])
@pytest.mark.parametrize("without_the_file", [False, True])
def test_the_digits_are_scikit_learn_s(split, part, without_the_file, monkeypatch):
    from sklearn.datasets import load_digits

    d = load_digits()  # the truth: scikit-learn's loader, 0..16 scaled to 0..255
    if without_the_file:  # where scikit-learn's data file cannot be found, its loader is used
        monkeypatch.setattr(data_lib.importlib.util, "find_spec", lambda name: None)
    images, labels = data_lib.load_digits(split)
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    np.testing.assert_array_equal(images, np.round(d.images[part] * (255 / 16)).astype(np.uint8)[..., None])
    np.testing.assert_array_equal(labels, d.target[part])


def test_make_source_digits_with_valid_channels():
    src = data_lib.make_source(_data_config("digits", channels=1))
    assert len(src) == data_lib.DIGITS_TRAIN and src.get([0]).shape == (1, 8, 8, 1)


class _SlowRecords:
    """Records that decode a JPEG on read (as a tfds record read does), each after a random delay."""

    def __init__(self, n, seed=0):
        import io

        from PIL import Image

        rng = np.random.default_rng(seed)
        self.blobs, self.labels = [], rng.integers(0, 3, n)
        for _ in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(buf, format="JPEG")
            self.blobs.append(buf.getvalue())
        self.delays = rng.uniform(0, 0.004, n)

    def __len__(self):
        return len(self.blobs)

    def __getitem__(self, i):
        import io
        import time

        from PIL import Image

        time.sleep(self.delays[i])
        if self.blobs[i] is None:
            raise OSError(f"record {i} is unreadable")
        return {"image": np.asarray(Image.open(io.BytesIO(self.blobs[i])).convert("RGB")), "label": self.labels[i]}


def test_batch_loader_reads_records_as_process_batch_gives_them():
    src = data_lib.RecordSource(_SlowRecords(37), "slow", 8, "center", ("a", "b", "c"))
    for labelled in (False, True):
        want = [data_lib.process_batch(src, 12, s, 5, p, 2, labelled=labelled) for s in range(6) for p in range(2)]
        got = []
        for p in range(2):
            with data_lib.BatchLoader(src, 12, 5, p, 2, labelled=labelled, workers=0) as load:
                got.append([load(s) for s in range(6)])
        got = [got[p][s] for s in range(6) for p in range(2)]
        for a, b in zip(got, want):
            for x, y in zip(*((a, b) if labelled else ((a,), (b,)))):
                np.testing.assert_array_equal(x, y)
    with data_lib.BatchLoader(src, 12, 5) as load:  # a jump back (a resumed run) starts over
        assert [load(s).shape for s in (0, 1, 4, 2)] == [(12, 8, 8, 3)] * 4
        np.testing.assert_array_equal(load(3), data_lib.process_batch(src, 12, 3, 5, 0, 1))


def test_batch_loader_raises_a_record_s_error_at_the_step_that_reads_it():
    records = _SlowRecords(8)
    src = data_lib.RecordSource(records, "slow", 8, "center")
    bad = int(data_lib.batch_indices(8, 4, 1, 0)[2])  # the third image of step 1
    records.blobs[bad] = None
    with data_lib.BatchLoader(src, 4, 0) as load:
        assert load(0).shape == (4, 8, 8, 3)
        with pytest.raises(OSError, match=f"record {bad} is unreadable"):
            load(1)
