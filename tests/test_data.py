"""Data sources, labelled subsets, binarization and the training streams."""

import gzip
import os
import struct

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from cagem_tf import data

# The real MNIST IDX files: $CAGEM_MNIST_DIR, else the developers' and CI's copy beside the checkout.
SHARED_MNIST = os.environ.get("CAGEM_MNIST_DIR") or os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def _images(n, shape=(4, 4), seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _labels(n, classes=3):
    return (np.arange(n) % classes).astype(np.int64)


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_idx_dir(folder, arrays, gz=True):
    os.makedirs(folder, exist_ok=True)
    for key, name in data.IDX_FILES.items():
        write_idx(os.path.join(folder, name + (".gz" if gz else "")), arrays[key])
    return str(folder)


def _raw(n_train=30, n_test=12):
    return {"x_train": _images(n_train), "y_train": _labels(n_train),
            "x_test": _images(n_test, seed=1), "y_test": _labels(n_test)}


# --------------------------------------------------------------------------------------------
# Sources
@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    raw = _raw()
    arrays = data.load(write_idx_dir(tmp_path / "idx", raw, gz))
    np.testing.assert_array_equal(arrays.x_train[..., 0], raw["x_train"])
    np.testing.assert_array_equal(arrays.y_test, raw["y_test"])
    assert arrays.num_classes == 3 and arrays.image_shape == (4, 4, 1)


def test_npz_round_trip_uint8_and_float(tmp_path):
    raw = _raw()
    np.savez(tmp_path / "a.npz", **raw)
    a = data.load(str(tmp_path / "a.npz"))
    np.testing.assert_array_equal(a.x_train[..., 0], raw["x_train"])
    as_float = dict(raw, x_train=raw["x_train"][..., None] / 255.0,
                    x_test=(raw["x_test"] / 255.0).astype(np.float32))
    np.savez(tmp_path / "b.npz", **as_float)
    b = data.load(str(tmp_path / "b.npz"))
    np.testing.assert_array_equal(b.x_train, a.x_train)
    np.testing.assert_array_equal(b.x_test, a.x_test)


def _load_with_mock_tfds(monkeypatch, name, num_examples):
    monkeypatch.setattr(data, "_reachable", lambda host: True)
    with tfds.testing.mock_data(num_examples=num_examples):
        return data.load(name, log=lambda message: None)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "kmnist"])
def test_tfds_sources(monkeypatch, name):
    arrays = _load_with_mock_tfds(monkeypatch, name, 20)
    assert arrays.x_train.shape == (20, 28, 28, 1) and arrays.x_train.dtype == np.uint8
    assert arrays.num_classes == 10 and arrays.y_train.max() < 10


def test_tfds_omniglot_is_28x28_with_alphabet_labels(monkeypatch):
    arrays = _load_with_mock_tfds(monkeypatch, "omniglot", 40)
    assert arrays.image_shape == (28, 28, 1) and arrays.num_classes == 50
    assert len(arrays.x_train) + len(arrays.x_test) == 40


def test_omniglot_images_invert_and_area_downscale():
    """White paper with a black 16x16 square -> ink bright, and area resizing averages it."""
    page = np.full([1, 105, 105, 3], 255, np.uint8)
    page[0, :16, :16] = 0
    small = data.omniglot_images(page)
    assert small.shape == (1, 28, 28, 1)
    assert small[0, 0, 0, 0] == 255 and small[0, 27, 27, 0] == 0
    # 105/28 = 3.75 input pixels per output pixel: pixel 4 covers input 15.0-18.75, of which
    # one pixel is ink (255 / 3.75 = 68), pixel 5 only paper.
    assert small[0, 5, 5, 0] == 0 and small[0, 4, 0, 0] == 68


def test_tfds_offline_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "_reachable", lambda host: False)
    with pytest.raises(data.DataError, match="offline.*--manual_dir"):
        data.load("kmnist", data_dir=str(tmp_path), log=lambda message: None)


@pytest.mark.e2e  # tfds prepares all 70,000 images: 30 s on a 2-core AVX2 machine
@pytest.mark.skipif(not os.path.isdir(SHARED_MNIST), reason="../shared/data/mnist is absent")
def test_real_mnist_prepared_offline_from_manual_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_reachable", lambda host: False)  # no network may be used
    messages = []
    arrays = data.load("mnist", data_dir=str(tmp_path), manual_dir=SHARED_MNIST,
                       log=messages.append)
    assert "mnist" in messages[0] and "manual_dir" in messages[0]
    assert arrays.x_train.shape == (60000, 28, 28, 1) and arrays.x_test.shape == (10000, 28, 28, 1)
    assert np.bincount(arrays.y_train).tolist() == MNIST_TRAIN_COUNTS
    from_idx = data.load(SHARED_MNIST)  # the same files read directly, no tfds
    np.testing.assert_array_equal(np.sort(from_idx.y_test), np.sort(arrays.y_test))
    assert from_idx.x_train.sum(dtype=np.int64) == arrays.x_train.sum(dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Labelled subsets
def test_labelled_subset_is_balanced_and_deterministic():
    y = np.repeat(np.arange(4), [50, 30, 40, 25])
    a = data.labelled_indices(y, 20, 4, seed=7)
    assert np.bincount(y[a], minlength=4).tolist() == [5, 5, 5, 5]
    np.testing.assert_array_equal(a, data.labelled_indices(y, 20, 4, seed=7))
    assert not np.array_equal(a, data.labelled_indices(y, 20, 4, seed=8))
    assert len(data.labelled_indices(y, 0, 4, seed=7)) == 0


def test_hold_out_moves_examples_to_evaluation():
    arrays = data._checked(_raw(), "raw")
    held = data.hold_out(arrays, 10, seed=0)
    assert len(held.x_train) == 20 and len(held.x_test) == 10
    both = np.concatenate([held.x_train, held.x_test])
    assert sorted(map(bytes, both)) == sorted(map(bytes, arrays.x_train))


# --------------------------------------------------------------------------------------------
# Binarization and streams
def test_dynamic_binarization_matches_intensities():
    intensities = np.array([0, 64, 128, 200, 255], np.uint8)
    images = np.tile(intensities, (4000, 1))
    draws = data.binarize(tf.constant(images), tf.constant([3, 4])).numpy()
    mean, p = draws.mean(0), intensities / 255.0
    stderr = np.sqrt(p * (1 - p) / len(images))
    assert np.all(np.abs(mean - p) <= 4 * stderr + 1e-9), (mean, p)
    again = data.binarize(tf.constant(images), tf.constant([3, 5])).numpy()
    assert not np.array_equal(draws, again)


def test_test_images_are_binarized_once_by_the_seed():
    x = _images(50)[..., None]
    first, second = data.binarize_once(x, 1), data.binarize_once(x, 1)
    np.testing.assert_array_equal(first, second)
    assert set(np.unique(first)) <= {0.0, 1.0}
    assert not np.array_equal(first, data.binarize_once(x, 2))


def test_training_stream_layout():
    """Intensities 0 or 255 binarize exactly, so labelled batches can be traced to their images."""
    n = 60
    x = (np.random.default_rng(0).random((n, 3, 3, 1)) < 0.5).astype(np.uint8) * 255
    y = _labels(n)
    arrays = data._checked({"x_train": x, "y_train": y, "x_test": x[:8], "y_test": y[:8]}, "t")
    labelled = data.labelled_indices(arrays.y_train, 6, 3, seed=0)
    s = data.streams(arrays, labelled, batch_size=25, labelled_batch_size=100, seed=0)
    assert (s.num_unlabelled, s.num_labelled) == (60, 6)
    assert sum(1 for _ in s.train) == 2 == s.steps_per_epoch  # one pass, whole batches
    batches = list(s.train)
    assert len(batches) == 2
    known = {x[i].tobytes(): y[i] for i in labelled}
    for b in batches:
        assert b["x"].shape == (25, 3, 3, 1) and b["x_labelled"].shape == (6, 3, 3, 1)
        for image, label in zip(b["x_labelled"].numpy(), b["y_labelled"].numpy()):
            assert known[(image * 255).astype(np.uint8).tobytes()] == label
    unsupervised = data.streams(arrays, labelled[:0], batch_size=25)
    assert set(next(iter(unsupervised.train))) == {"x"}


# --------------------------------------------------------------------------------------------
# Bad input: one line that says what to do
def _save(tmp_path, **arrays):
    path = tmp_path / f"bad{len(list(tmp_path.iterdir()))}.npz"
    np.savez(path, **arrays)
    return str(path)


def test_bad_sources(tmp_path):
    raw = _raw()
    cases = [
        ("no_such_set", "unknown data set"),
        (str(tmp_path / "missing.npz"), "no such file"),
        (_save(tmp_path, x_train=raw["x_train"], y_train=raw["y_train"]), "missing arrays"),
        (_save(tmp_path, **dict(raw, y_train=raw["y_train"][:-1])), "y_train must be"),
        (_save(tmp_path, **dict(raw, x_test=_images(12, (5, 5)))), "one image shape"),
        (_save(tmp_path, **dict(raw, x_train=np.zeros((30, 4, 4, 2), np.uint8))),
         r"C = 1 \(grey\) or 3 \(colour\)"),
        (_save(tmp_path, **dict(raw, x_train=np.zeros((30, 4, 4, 3), np.uint8))),
         "one image shape"),  # colour train images, grey test images
        (_save(tmp_path, **dict(raw, x_train=raw["x_train"] * 2.0 / 255)), r"\[0, 1\]"),
        (_save(tmp_path, **dict(raw, y_train=-raw["y_train"])), "integer labels"),
        (_save(tmp_path, **dict(raw, y_test=raw["y_test"] + 5)), "out of range"),
    ]
    for dataset, message in cases:
        with pytest.raises(data.DataError, match=message) as error:
            data.load(dataset)
        assert "\n" not in str(error.value)


def test_corrupt_and_truncated_idx_name_the_file(tmp_path):
    folder = write_idx_dir(tmp_path / "idx", _raw())
    victim = os.path.join(folder, "train-images-idx3-ubyte.gz")
    with open(victim, "rb") as f:
        content = f.read()
    with open(victim, "wb") as f:
        f.write(content[: len(content) // 2])
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte.gz.*truncated"):
        data.load(folder)
    with open(victim, "wb") as f:
        f.write(b"not gzip at all")
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte.gz"):
        data.load(folder)
    plain = write_idx_dir(tmp_path / "plain", _raw(), gz=False)
    victim = os.path.join(plain, "t10k-labels-idx1-ubyte")
    with open(victim, "r+b") as f:
        f.truncate(10)
    with pytest.raises(data.DataError, match="t10k-labels-idx1-ubyte.*truncated"):
        data.load(plain)


def test_bad_label_counts():
    y = np.repeat(np.arange(3), [10, 4, 10])
    for n, message in [(-3, ">= 0"), (10, "multiple of the 3"), (15, "only 4")]:
        with pytest.raises(data.DataError, match=message):
            data.labelled_indices(y, n, 3, seed=0)


def test_bad_stream_settings():
    arrays = data._checked(_raw(), "raw")
    with pytest.raises(data.DataError, match="--batch_size"):
        data.streams(arrays, np.zeros([0], np.int64), batch_size=0)
    with pytest.raises(data.DataError, match="--validation"):
        data.hold_out(arrays, 30, seed=0)


def test_own_images_that_cannot_be_scored_are_one_line_errors(tmp_path):
    from cagem_tf import images
    np.savez(tmp_path / "empty.npz")
    np.savez(tmp_path / "none.npz", x=np.zeros([0, 4, 4], np.uint8))
    np.savez(tmp_path / "negative.npz", x=np.full([2, 4, 4], -0.5, np.float32))
    np.savez(tmp_path / "nan.npz", x=np.full([2, 4, 4], np.nan, np.float32))
    for name, message in (("empty.npz", "holds no array"), ("none.npz", "holds no image"),
                          ("negative.npz", "values from -0.5"), ("nan.npz", "not finite")):
        with pytest.raises(images.ImageError, match=message) as error:
            images.load(str(tmp_path / name), (4, 4, 1))
        assert "\n" not in str(error.value)
    np.savez(tmp_path / "fine.npz", x=np.full([2, 4, 4], 255, np.uint8))
    assert images.load(str(tmp_path / "fine.npz"), (4, 4, 1)).x.max() == 1.0
