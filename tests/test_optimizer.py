"""The fused Adam: Keras' Adam step for step, its checkpoints, under XLA and a strategy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from cagem_tf import optimizer, training
from cagem_tf.config import Config

SHAPES = [(7, 5), (5,), (3, 4, 2)]


def _variables(seed=0):
    rng = np.random.default_rng(seed)
    return [keras.Variable(rng.normal(size=s).astype(np.float32)) for s in SHAPES]


def _gradients(step):
    rng = np.random.default_rng(100 + step)
    return [tf.constant(rng.normal(size=s).astype(np.float32)) for s in SHAPES]


def _train(opt, variables, steps, start=0, apply=None):
    apply = apply or (lambda grads: opt.apply(grads, variables))
    for step in range(start, start + steps):
        apply(_gradients(step))
    return [v.numpy() for v in variables]


@pytest.mark.parametrize("settings", [{}, {"global_clipnorm": 1.0},
                                      {"learning_rate": 0.05, "beta_1": 0.5, "epsilon": 1e-3}])
def test_the_fused_adam_takes_the_steps_of_keras_adam(settings):
    ours, theirs = _variables(), _variables()
    fused, reference = optimizer.Adam(**settings), keras.optimizers.Adam(**settings)
    got, want = _train(fused, ours, 6), _train(reference, theirs, 6)
    atol = 1e-4 * settings.get("learning_rate", 1e-3)  # rounding, far below one step's move
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol)
    assert not np.allclose(got[0], _variables()[0].numpy())  # it moved
    for a, b in zip(fused.variables, reference.variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=atol)


def test_the_fused_adam_runs_in_an_xla_compiled_function():
    ours, theirs = _variables(), _variables()
    fused = optimizer.Adam(0.01)
    fused.build(ours)
    step = tf.function(lambda grads: fused.apply(grads, ours), jit_compile=True)
    got = _train(fused, ours, 3, apply=step)
    want = _train(keras.optimizers.Adam(0.01), theirs, 3)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_a_checkpoint_of_keras_adam_resumes_in_the_fused_adam(tmp_path):
    saved, reference = _variables(), _variables()
    before = keras.optimizers.Adam(0.01)
    _train(before, saved, 3)
    path = tf.train.Checkpoint(weights=saved, optimizer=before).write(str(tmp_path / "ckpt"))
    resumed = _variables(seed=1)
    after = optimizer.Adam(0.01)
    after.build(resumed)
    tf.train.Checkpoint(weights=resumed, optimizer=after).read(path).assert_consumed()
    got = _train(after, resumed, 2, start=3)
    want = _train(keras.optimizers.Adam(0.01), reference, 5)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_the_fused_adam_updates_mirrored_variables_under_a_strategy():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        ours = _variables()
        fused = optimizer.Adam(0.01)
        fused.build(ours)

    def replica_step(grads):
        with tf.GradientTape() as tape:  # a loss whose gradients are `grads`
            loss = tf.add_n([tf.reduce_sum(v * g) for v, g in zip(ours, grads)])
        fused.apply(tape.gradient(loss, ours), ours)

    @tf.function
    def step(grads):
        strategy.run(replica_step, args=(grads,))

    got = _train(fused, ours, 3, apply=step)
    want = _train(keras.optimizers.Adam(0.01), _variables(), 3)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_the_trained_model_is_compiled_with_the_fused_adam_and_it_round_trips_its_config():
    model = training.build_model(Config(hidden_lower=16, hidden_upper=8, z1_dim=2, z2_dim=2),
                                 (4, 4, 1), 2, alpha=0.0)
    assert type(model.optimizer) is optimizer.Adam
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(model.optimizer))
    assert type(restored) is optimizer.Adam
    assert float(restored.learning_rate) == pytest.approx(float(model.optimizer.learning_rate))


def test_the_fused_adam_updates_each_variable_with_one_fused_kernel():
    variables, fused = _variables(), optimizer.Adam()
    fused.build(variables)
    graph = tf.function(lambda grads: fused.apply(grads, variables)).get_concrete_function(
        _gradients(0)).graph
    types = [op.type for op in graph.get_operations()]
    assert types.count("ResourceApplyAdam") == len(SHAPES)
    assert "Sqrt" not in types  # Keras' elementwise update is not also there
