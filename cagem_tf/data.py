"""Data: image arrays from tensorflow-datasets or local files, balanced labelled subsets, and the
dynamically binarized streams CaGeM trains on.

Images are kept as uint8 [N,H,W,1] intensities (ink bright) and binarized in the tf.data graph:
each time a training image is drawn, x ~ Bernoulli(intensity / 255). The test set is binarized
once with a fixed seed (the LVAE/Parmesan protocol).
"""

import dataclasses
import gzip
import os
import socket
import struct
import zlib

import numpy as np
import tensorflow as tf

from cagem_tf.files import UserError

TFDS_NAMES = ("mnist", "fashion_mnist", "kmnist", "omniglot", "cifar10", "svhn_cropped")
COLOURED = "coloured:"  # --dataset coloured:<data set>: each image tinted (`tinted`)
IDX_FILES = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
             "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
# Where tfds downloads each data set from: probed before a download so that an offline machine
# fails in seconds instead of retrying for minutes.
TFDS_HOSTS = {"mnist": "storage.googleapis.com",
              "fashion_mnist": "fashion-mnist.s3-website.eu-central-1.amazonaws.com",
              "kmnist": "codh.rois.ac.jp", "omniglot": "github.com",
              "cifar10": "www.cs.toronto.edu", "svhn_cropped": "ufldl.stanford.edu"}
OMNIGLOT_SIZE = 28
OMNIGLOT_TRAIN_DRAWINGS = 15  # of the 20 drawings of each character; the rest is the test set


class DataError(UserError, ValueError):
    """Bad data input; the message is one line that says what to do."""


@dataclasses.dataclass
class Arrays:
    """A labelled image data set: x uint8 [N,H,W,C] (C = 1 or 3), y int64 [N] in [0, num_classes)."""
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str

    @property
    def image_shape(self):
        return tuple(self.x_train.shape[1:])


# --------------------------------------------------------------------------------------------
# Sources
def load(dataset: str, data_dir: str | None = None, manual_dir: str | None = None,
         log=print) -> Arrays:
    """A data set by tfds name (`TFDS_NAMES`), or a local `.npz` file or IDX directory;
    "coloured:<any of these>" tints each of its images with a colour of its own (`tinted`)."""
    if dataset.startswith(COLOURED):
        return tinted(load(dataset[len(COLOURED):], data_dir, manual_dir, log))
    if dataset in TFDS_NAMES:
        return _from_tfds(dataset, data_dir, manual_dir, log)
    if os.path.isdir(dataset):
        return _checked(_from_idx_dir(dataset), dataset)
    if os.path.isfile(dataset):
        if not dataset.endswith(".npz"):
            raise DataError(f"--dataset {dataset}: a local data set is an .npz file or a "
                            "directory of the four MNIST IDX files")
        return _checked(_from_npz(dataset), dataset)
    if os.sep in dataset or dataset.endswith(".npz"):
        raise DataError(f"--dataset {dataset}: no such file or directory")
    raise DataError(f"--dataset {dataset}: unknown data set; use one of {', '.join(TFDS_NAMES)}, "
                    "an .npz file or a directory of IDX files")


def _from_npz(path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in NPZ_KEYS if k not in f.files]
            if missing:
                raise DataError(f"{path}: missing arrays {', '.join(missing)}; an .npz data set "
                                f"holds {', '.join(NPZ_KEYS)}")
            return {k: f[k] for k in NPZ_KEYS}
    except (OSError, ValueError, zlib.error) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: not a readable .npz file ({e})") from None


def read_idx(path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a uint8 array of the shape its header gives."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated file ({e}); download it again") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != int(np.prod(shape)):
        raise DataError(f"{path}: holds {len(data) - header} bytes of data, its header says "
                        f"{int(np.prod(shape))}; the file is truncated, download it again")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def _from_idx_dir(path) -> dict:
    arrays = {}
    for key, name in IDX_FILES.items():
        candidates = [os.path.join(path, name + ext) for ext in (".gz", "")]
        found = [c for c in candidates if os.path.isfile(c)]
        if not found:
            raise DataError(f"{path}: {name}[.gz] not found; an IDX directory holds "
                            f"{', '.join(IDX_FILES.values())} (.gz or not)")
        arrays[key] = read_idx(found[0])
    return arrays


def _as_images(x, what) -> np.ndarray:
    """uint8 0-255 or float 0-1 images [N,H,W] or [N,H,W,C], C = 1 (grey) or 3 (colour) ->
    uint8 [N,H,W,C]."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(f"{what}: images must be [N,H,W] or [N,H,W,C] with C = 1 (grey) or 3 "
                        f"(colour), got shape {list(x.shape)}")
    if np.issubdtype(x.dtype, np.floating):
        if x.size and (np.nanmin(x) < 0 or np.nanmax(x) > 1 or np.isnan(x).any()):
            raise DataError(f"{what}: float images must lie in [0, 1]")
        return np.round(x * 255).astype(np.uint8)
    if np.issubdtype(x.dtype, np.integer):
        if x.size and (x.min() < 0 or x.max() > 255):
            raise DataError(f"{what}: integer images must lie in [0, 255]")
        return x.astype(np.uint8)
    raise DataError(f"{what}: images of dtype {x.dtype}; use uint8 (0-255) or float (0-1)")


def _checked(raw: dict, name: str, num_classes: int | None = None) -> Arrays:
    x_train, x_test = _as_images(raw["x_train"], f"{name} x_train"), _as_images(
        raw["x_test"], f"{name} x_test")
    y_train, y_test = (np.asarray(raw[k]) for k in ("y_train", "y_test"))
    for x, y, split in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{name}: y_{split} must be [N] with N = len(x_{split}) = {len(x)}, "
                            f"got shape {list(y.shape)}")
        if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0):
            raise DataError(f"{name}: y_{split} must hold integer labels 0..C-1")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{name}: train images are {list(x_train.shape[1:])}, test images "
                        f"{list(x_test.shape[1:])}; both splits need one image shape")
    if len(x_train) == 0:
        raise DataError(f"{name}: the training split is empty")
    if num_classes is None:
        num_classes = int(y_train.max()) + 1
    if y_train.max() >= num_classes or (y_test.size and y_test.max() >= num_classes):
        raise DataError(f"{name}: labels out of range: the training labels span 0..{num_classes - 1}")
    return Arrays(x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64),
                  int(num_classes), name)


def _reachable(host: str) -> bool:
    try:
        socket.create_connection((host, 443), timeout=5).close()
        return True
    except OSError:
        return False


def _from_tfds(name, data_dir, manual_dir, log) -> Arrays:
    import tensorflow_datasets as tfds  # only this path needs it

    if manual_dir is not None and not os.path.isdir(manual_dir):
        raise DataError(f"--manual_dir {manual_dir}: no such directory")
    config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
    log(f"Loading '{name}' with tensorflow-datasets (data_dir={data_dir or 'default'}, "
        f"manual_dir={manual_dir or 'none'}); preparing it may download the data set.")
    if manual_dir is None and not tfds.builder(name, data_dir=data_dir).is_prepared():
        host = TFDS_HOSTS[name]
        if not _reachable(host):
            raise DataError(f"'{name}' is not prepared and {host} cannot be reached: this machine "
                            "seems offline; pass --manual_dir DIR holding the original files, or "
                            "--dataset PATH to a local .npz or IDX directory") from None
    kwargs = dict(data_dir=data_dir, download_and_prepare_kwargs={"download_config": config})
    try:
        if name == "omniglot":
            return _omniglot(_in_memory(tfds.load(name, split="train+test", **kwargs)), name)
        splits, info = tfds.load(name, split=["train", "test"], as_supervised=True,
                                 with_info=True, **kwargs)
        (x_train, y_train), (x_test, y_test) = (_in_memory(s) for s in splits)
    except DataError:
        raise
    except Exception as e:  # tfds raises many kinds when it cannot reach the data
        raise DataError(
            f"tensorflow-datasets could not prepare '{name}' ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''}); this machine seems offline: pass "
            "--manual_dir DIR holding the original files, or --dataset PATH to a local .npz or "
            "IDX directory") from None
    num_classes = info.features["label"].num_classes
    return _checked({"x_train": x_train, "y_train": y_train, "x_test": x_test,
                     "y_test": y_test}, name, num_classes)


def _in_memory(dataset):
    """A finite tf.data.Dataset as NumPy arrays of the same structure, read in large batches."""
    batches = list(dataset.batch(8192).as_numpy_iterator())
    return tf.nest.map_structure(lambda *parts: np.concatenate(parts), *batches)


def omniglot_images(images) -> np.ndarray:
    """tfds OMNIGLOT [N,105,105,3] (dark ink on white) -> uint8 [N,28,28,1], ink bright, by area
    downscaling."""
    gray = 255.0 - tf.reduce_mean(tf.cast(images, tf.float32), axis=-1, keepdims=True)
    small = tf.image.resize(gray, [OMNIGLOT_SIZE, OMNIGLOT_SIZE], method="area")
    return np.clip(np.round(small.numpy()), 0, 255).astype(np.uint8)


def _omniglot(data, name) -> Arrays:
    """All drawings of both tfds splits; per character the first 15 drawings train, the others
    test; the label is the alphabet (50 clusters)."""
    character = np.asarray(data["label"])
    order = np.argsort(character, kind="stable")
    position = np.empty(len(order), np.int64)
    _, starts = np.unique(character[order], return_index=True)
    for begin, end in zip(starts, list(starts[1:]) + [len(order)]):
        position[order[begin:end]] = np.arange(end - begin)
    train = position < OMNIGLOT_TRAIN_DRAWINGS
    x, y = omniglot_images(data["image"]), np.asarray(data["alphabet"])
    return _checked({"x_train": x[train], "y_train": y[train], "x_test": x[~train],
                     "y_test": y[~train]}, name, num_classes=50)


# --------------------------------------------------------------------------------------------
# Subsets
def hold_out(arrays: Arrays, size: int, seed: int) -> Arrays:
    """Moves `size` random training examples into the evaluation split (replacing the test set),
    for model selection that never sees the test set."""
    if size <= 0:
        return arrays
    if size >= len(arrays.x_train):
        raise DataError(f"--validation {size}: must be smaller than the training set "
                        f"({len(arrays.x_train)})")
    order = np.random.default_rng(seed).permutation(len(arrays.x_train))
    keep, held = np.sort(order[:-size]), np.sort(order[-size:])
    return Arrays(arrays.x_train[keep], arrays.y_train[keep], arrays.x_train[held],
                  arrays.y_train[held], arrays.num_classes, arrays.name + ":validation")


def labelled_indices(y: np.ndarray, num_labels: int, num_classes: int, seed: int) -> np.ndarray:
    """`num_labels` training indices, num_labels / C per class, chosen by `seed` (NumPy's PCG64:
    the same indices on any machine); sorted int64."""
    if num_labels < 0:
        raise DataError(f"--labels {num_labels}: must be >= 0 (0 trains unsupervised)")
    if num_labels == 0:
        return np.zeros([0], np.int64)
    if num_labels % num_classes:
        raise DataError(f"--labels {num_labels}: must be a multiple of the {num_classes} "
                        f"classes, e.g. {num_classes * max(1, num_labels // num_classes)}")
    per_class = num_labels // num_classes
    counts = np.bincount(y, minlength=num_classes)
    if per_class > counts.min():
        raise DataError(f"--labels {num_labels}: {per_class} per class, but class "
                        f"{int(counts.argmin())} has only {int(counts.min())} examples")
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(y == c))[:per_class] for c in range(num_classes)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Streams
def binarize(images, seed):
    """x ~ Bernoulli(images / 255) elementwise, from a stateless [2] seed; float32."""
    u = tf.random.stateless_uniform(tf.shape(images), seed)
    return tf.cast(u * 255.0 < tf.cast(images, tf.float32), tf.float32)


def binarize_once(images: np.ndarray, seed: int) -> np.ndarray:
    """A fixed binarization (NumPy, the same on any machine) for the test set; float32."""
    u = np.random.default_rng(seed).random(images.shape, dtype=np.float32)
    return (u * 255.0 < images).astype(np.float32)


def observed(images: np.ndarray, likelihood: str, seed: int) -> np.ndarray:
    """Images uint8 [N,...] as a model with `likelihood` sees them, float32 in [0, 1]:
    binarized once (`binarize_once`) for "bernoulli", the levels / 255 for
    "discretized_logistic". The test set of every evaluation."""
    if likelihood == "bernoulli":
        return binarize_once(images, seed)
    return np.asarray(images, np.float32) / np.float32(255)


def _observe(images, seed, likelihood: str):
    """The training stream's version of `observed`: binarized anew with every seed."""
    if likelihood == "bernoulli":
        return binarize(images, seed)
    return tf.cast(images, tf.float32) / 255.0


def tinted(arrays: Arrays, seed: int = 0) -> Arrays:
    """The coloured version of a grey data set: image i times a colour c_i of its own,
    c_i ~ U[0,1]^3 divided by its largest channel (so that ink keeps full brightness in one
    channel), drawn with `seed`, uint8 [N,H,W,3]; labels unchanged."""
    if arrays.x_train.shape[-1] != 1:
        raise DataError(f"{COLOURED}{arrays.name}: the images have colour already")
    rng = np.random.default_rng(seed)

    def tint(x):
        colour = rng.random((len(x), 1, 1, 3), dtype=np.float32) + np.float32(1e-3)
        colour /= colour.max(-1, keepdims=True)
        return np.round(x.astype(np.float32) * colour).astype(np.uint8)

    return Arrays(tint(arrays.x_train), arrays.y_train, tint(arrays.x_test), arrays.y_test,
                  arrays.num_classes, COLOURED + arrays.name)


def _with_noise_seeds(dataset, seed):
    """Pairs each element with a fresh stateless seed, new on every pass over the data."""
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    return tf.data.Dataset.zip(dataset, seeds)


@dataclasses.dataclass
class Streams:
    """The training stream: one pass over the unlabelled set per epoch.

    train yields {"x": [B,H,W,C]} and, with labels, "x_labelled" [L,H,W,C], "y_labelled" [L]
    (L = min(labelled_batch_size, N_l)); with pseudo-labels "y_pseudo" [B]. alpha uses N_u and
    N_l.
    """
    train: tf.data.Dataset
    num_unlabelled: int
    num_labelled: int
    steps_per_epoch: int  # N_u // B: the last partial batch is dropped


def streams(arrays: Arrays, labelled: np.ndarray, batch_size: int = 100,
            labelled_batch_size: int = 100, seed: int = 0,
            pseudo_labels: np.ndarray | None = None, likelihood: str = "bernoulli") -> Streams:
    """The paper's streams: an unlabelled batch from the whole training set (labelled points
    included) and a labelled batch from the labelled points at every step, each image as a
    model with `likelihood` sees it (binarized anew every step for "bernoulli").

    pseudo_labels [N_train], when given, go with each unlabelled image as "y_pseudo".
    """
    n = len(arrays.x_train)
    if not 0 < batch_size <= n:
        raise DataError(f"--batch_size {batch_size}: must be in 1..{n} (the training set size)")
    if labelled_batch_size <= 0:
        raise DataError(f"--labelled_batch_size {labelled_batch_size}: must be positive")
    autotune = tf.data.AUTOTUNE
    if pseudo_labels is None:
        unlabelled = tf.data.Dataset.from_tensor_slices(arrays.x_train)
        element = lambda x, s: {"x": _observe(x, s, likelihood)}
    else:
        unlabelled = tf.data.Dataset.from_tensor_slices(
            (arrays.x_train, np.asarray(pseudo_labels, np.int32)))
        element = lambda xy, s: {"x": _observe(xy[0], s, likelihood), "y_pseudo": xy[1]}
    unlabelled = (unlabelled.shuffle(n, seed=seed, reshuffle_each_iteration=True)
                  .batch(batch_size, drop_remainder=True))
    train = _with_noise_seeds(unlabelled, seed).map(element, num_parallel_calls=autotune)
    if len(labelled):
        size = min(labelled_batch_size, len(labelled))
        pairs = (tf.data.Dataset.from_tensor_slices(
            (arrays.x_train[labelled], arrays.y_train[labelled].astype(np.int32)))
                 .repeat().shuffle(len(labelled), seed=seed + 1).batch(size, drop_remainder=True))
        pairs = _with_noise_seeds(pairs, seed + 2).map(
            lambda xy, s: (_observe(xy[0], s, likelihood), xy[1]), num_parallel_calls=autotune)
        train = tf.data.Dataset.zip(train, pairs).map(
            lambda u, xy: {**u, "x_labelled": xy[0], "y_labelled": xy[1]})
    return Streams(train.prefetch(autotune), n, len(labelled), n // batch_size)
