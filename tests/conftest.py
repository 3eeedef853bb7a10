"""Shared fixtures: tiny CaGeM models that run in milliseconds on a CPU."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402

from cagem_tf import CaGeM  # noqa: E402


def tiny_cagem(**overrides):
    """A CaGeM over 5 binary pixels with 1-d z1 and z2, K=2 and 8-unit hidden layers."""
    settings = dict(image_shape=(5,), num_clusters=2, z1_dim=1, z2_dim=1, hidden_lower=(8, 8),
                    hidden_upper=(8, 8), seed=3)
    settings.update(overrides)
    keras.utils.set_random_seed(settings["seed"])  # the same weights on every run
    return CaGeM(**settings)


@pytest.fixture
def tiny():
    return tiny_cagem()
