"""One model spec: Config holds it, CaGeM takes it, get_config and the .keras file derive
from it."""

import dataclasses

import keras
import numpy as np
import pytest

from cagem_tf import CaGeM
from cagem_tf.config import Config, ConfigError, ModelSpec
from conftest import tiny_cagem


def test_config_holds_the_model_spec_and_every_spec_field_is_a_flag():
    config = Config(z1_dim=8, hidden_lower=[16], labels=20)
    assert config.spec() == ModelSpec(z1_dim=8, hidden_lower=[16, 16])
    flags = {name for name, *_ in Config.fields()}
    assert {f.name for f in dataclasses.fields(ModelSpec)} <= flags
    with pytest.raises(ConfigError, match="--z2_dim 0: must be at least 1"):
        ModelSpec(z2_dim=0)


def test_cagem_takes_the_spec_and_its_config_gives_it_back():
    spec = ModelSpec(z1_dim=3, z2_dim=2, hidden_lower=[8], hidden_upper=[6], num_samples=2)
    model = CaGeM(spec, image_shape=(5,), num_clusters=3, seed=1)
    assert model.spec == spec and model.q_z1.heads[0].kernel.shape[-1] == 3
    config = model.get_config()
    assert {k: config[k] for k in spec.to_dict()} == spec.to_dict()
    assert CaGeM.from_config(config).spec == spec
    # Keyword arguments named like a field override the spec.
    assert CaGeM(spec, image_shape=(5,), num_clusters=3, z1_dim=4).spec.z1_dim == 4


def test_a_keras_file_round_trips_to_identical_outputs(tmp_path):
    x = (np.random.default_rng(0).random((6, 5)) < 0.5).astype(np.float32)
    data = {"x": x, "x_labelled": x[:4], "y_labelled": np.array([0, 1, 0, 1])}
    model = tiny_cagem()
    model.compile(keras.optimizers.Adam(1e-2), alpha=2.5)
    for _ in range(3):
        model.train_step(data)
    model.save(str(tmp_path / "cagem.keras"))
    loaded = keras.saving.load_model(str(tmp_path / "cagem.keras"))
    assert isinstance(loaded, CaGeM) and loaded.get_config() == model.get_config()
    assert loaded.alpha == 2.5 and int(loaded.optimizer.iterations) == 3
    fresh = tiny_cagem(seed=4)
    seed = [1, 2]
    for out in (lambda m: m.iw_bound(x, 20, seed=seed), lambda m: m.classify(x, seed=seed)[0],
                lambda m: m.sample(4, seed=seed)[0], lambda m: m.encode(x)[1]):
        np.testing.assert_array_equal(np.asarray(out(loaded)), np.asarray(out(model)))
        assert not np.allclose(np.asarray(out(fresh)), np.asarray(out(model)))
    # Training goes on from the same state: the optimizer's moments came along.
    model.reset_metrics()  # the trackers average over an epoch's steps
    a, b = model.train_step(data), loaded.train_step(data)
    assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-6)
