"""Shared fixtures: tiny CaGeM models that run in milliseconds on a CPU."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cagem_tf import CaGeM  # noqa: E402
from cagem_tf.model import NETWORKS  # noqa: E402


# A row's answer alone and in a batch: equal up to float32 rounding, since oneDNN picks its
# matmul kernel by batch size (on the AMX Xeon the last bit differed).
BATCH_ROUNDING = dict(rtol=1e-5, atol=1e-6)


def tiny_cagem(**overrides):
    """A CaGeM over 5 binary pixels with 1-d z1 and z2, K=2 and 8-unit hidden layers.

    The log sigma heads, which start at zero in the library, get random weights here so that
    the tests exercise scales that vary with the inputs."""
    settings = dict(image_shape=(5,), num_clusters=2, z1_dim=1, z2_dim=1, hidden_lower=(8, 8),
                    hidden_upper=(8, 8), seed=3)
    settings.update(overrides)
    keras.utils.set_random_seed(settings["seed"])  # the same weights on every run
    model = CaGeM(**settings)
    rng = np.random.default_rng(settings["seed"])
    for name in NETWORKS:
        for head in getattr(model, name).heads:
            if head.name == "log_scale" and hasattr(head, "kernel"):  # a Dense head
                head.kernel.assign(rng.normal(0.0, 0.5, head.kernel.shape).astype(np.float32))
    return model


@pytest.fixture
def processes():
    """A list for the subprocesses a test starts; those still running are killed afterwards,
    also when the test fails."""
    started = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


@pytest.fixture
def tiny():
    return tiny_cagem()


def clustered_npz(path, side: int, n_train: int, n_test: int) -> str:
    """An .npz data set of three clusters: random binary prototypes of side x side pixels with
    10% of the pixels flipped, ink 255; labels 0-2 in turn."""
    rng = np.random.default_rng(0)
    prototypes = rng.random((3, side, side)) < 0.4
    n = n_train + n_test
    y = np.arange(n) % 3
    x = ((prototypes[y] ^ (rng.random((n, side, side)) < 0.1)) * 255).astype(np.uint8)
    np.savez(path, x_train=x[:n_train], y_train=y[:n_train], x_test=x[n_train:],
             y_test=y[n_train:])
    return str(path)
