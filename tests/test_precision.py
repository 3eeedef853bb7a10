"""Mixed precision: bfloat16 matmuls, float32 densities, loss, variables and evaluations."""

import numpy as np
import pytest
import tensorflow as tf

from cagem_tf import objective, report, rundir, training
from cagem_tf.config import Config
from cagem_tf.model import NETWORKS
from conftest import clustered_npz, tiny_cagem

SETTINGS = dict(image_shape=(12,), num_clusters=3, z1_dim=3, z2_dim=2, hidden_lower=(32, 32),
                hidden_upper=(32, 32))


def _pair():
    """A float32 model and its bfloat16 copy with the same weights. The log-scale heads are
    shrunk from tiny_cagem's N(0, 0.5^2): with 32 inputs those give scales of e^-10 and a
    loss of 10^9 nats, dominated by a few terms that amplify each rounding differently on
    every instruction set (2.3% off on an AVX2-only CPU); here the loss is tens of nats."""
    full = tiny_cagem(**SETTINGS)
    for name in NETWORKS:
        for head in getattr(full, name).heads:
            if head.name == "log_scale":
                head.kernel.assign(0.1 * head.kernel)
    mixed = tiny_cagem(**SETTINGS, precision="mixed_bfloat16")
    for a, b in zip(mixed.weights, full.weights):
        a.assign(b)
    return full, mixed


def _loss_and_grads(model, x):
    with tf.GradientTape() as tape:
        terms = model.latent_terms(x, 4, seed=tf.constant([3, 4]), training=True)
        loss = -tf.reduce_mean(objective.elbo(terms)["objective"])
    return loss, tape.gradient(loss, model.trainable_variables), terms


def test_mixed_step_agrees_with_float32_and_keeps_densities_in_float32():
    full, mixed = _pair()
    x = (np.random.default_rng(0).random((64, 12)) < 0.4).astype(np.float32)
    loss, grads, _ = _loss_and_grads(full, x)
    mixed_loss, mixed_grads, terms = _loss_and_grads(mixed, x)
    # bfloat16 keeps 8 bits of mantissa: about 0.4% per rounding.
    assert 1 < abs(float(loss)) < 1000  # the scale the tolerances are for
    assert abs(float(mixed_loss) - float(loss)) < 0.02 * abs(float(loss))
    flat = tf.concat([tf.reshape(g, [-1]) for g in grads], 0)
    mixed_flat = tf.concat([tf.reshape(g, [-1]) for g in mixed_grads], 0)
    assert mixed_flat.dtype == tf.float32
    cosine = tf.reduce_sum(flat * mixed_flat) / (tf.norm(flat) * tf.norm(mixed_flat))
    assert float(cosine) > 0.99
    assert abs(float(tf.norm(mixed_flat) / tf.norm(flat)) - 1) < 0.05
    for name, value in terms.items():
        assert value.dtype == tf.float32, name
    assert all(v.dtype == tf.float32 for v in mixed.weights)
    assert mixed.q_z1.projections[0].compute_dtype == "bfloat16"


def test_the_float32_twin_computes_in_float32_with_the_same_weights():
    full, mixed = _pair()
    twin = mixed.float32_twin()
    x = (np.random.default_rng(1).random((16, 12)) < 0.4).astype(np.float32)
    seed = tf.constant([5, 6])
    np.testing.assert_allclose(twin.iw_bound(x, 50, seed=seed), full.iw_bound(x, 50, seed=seed),
                               rtol=1e-5)
    mixed.q_z1.heads[0].bias.assign_add(tf.ones_like(mixed.q_z1.heads[0].bias))
    assert mixed.float32_twin() is twin  # refreshed, not rebuilt
    np.testing.assert_array_equal(twin.q_z1.heads[0].bias, mixed.q_z1.heads[0].bias)


@pytest.mark.e2e  # a whole training run or export
def test_a_tiny_mixed_run_trains_exports_evaluates_and_keeps_its_precision(tmp_path):
    data = clustered_npz(tmp_path / "tiny.npz", 6, 300, 60)
    config = Config(dataset=data, model_dir=str(tmp_path / "run"), labels=6, epochs=2,
                    hidden_lower=[16], hidden_upper=[16], z1_dim=3, z2_dim=2, batch_size=50,
                    eval_every=1, eval_subset=30, eval_iw_samples=5, verbose=0,
                    precision="mixed_bfloat16", export_iw_samples=[20])
    logs = training.train(config, log=lambda m: None)
    assert np.isfinite(logs["loss"])
    exported = tf.saved_model.load(str(tmp_path / "run" / "export" / "2"))
    x = np.zeros([2, 6, 6, 1], np.float32)
    assert exported.signatures["log_likelihood_20"](x=x)["log_likelihood"].dtype == tf.float32
    assert rundir.load_model(config.model_dir).spec.precision == "float32"
    results = report.evaluate(config.model_dir, iw_samples=(10,), subset=30, batch_size=10,
                              figures_too=False, progress=False, log=lambda m: None)
    assert np.isfinite(results["bounds"]["10"]["mean"])
    with pytest.raises(rundir.RunError, match="--precision"):
        training.train(config.replace(precision="float32", epochs=3), log=lambda m: None)


@pytest.mark.parametrize("channels, kernel_dtype", [(500, tf.float32), (512, tf.bfloat16)])
def test_bfloat16_batch_norm_runs_in_float32_off_the_multiple_of_16(channels, kernel_dtype):
    """oneDNN's bfloat16 batch norm is fast only at multiples of 16 channels: elsewhere the
    fused kernel runs in float32 and the layer still answers in bfloat16, with float32's values."""
    import keras
    from cagem_tf.networks import BatchNorm
    norm = BatchNorm(dtype=keras.DTypePolicy("mixed_bfloat16"))
    x = tf.cast(tf.random.stateless_normal([3, 40, channels], [1, 2]) * 3.0 + 1.0, tf.bfloat16)
    norm.build(x.shape)
    graph = tf.function(lambda u: norm(u, training=True)).get_concrete_function(x).graph
    kernels = [op for op in graph.get_operations() if op.type.startswith("FusedBatchNorm")]
    assert [op.get_attr("T") for op in kernels] == [kernel_dtype.as_datatype_enum]
    out = norm(x, training=True)
    assert out.dtype == tf.bfloat16
    flat = tf.reshape(tf.cast(x, tf.float32), [-1, channels])
    expected = (flat - tf.reduce_mean(flat, 0)) / tf.sqrt(tf.math.reduce_variance(flat, 0) + 1e-3)
    np.testing.assert_allclose(tf.reshape(tf.cast(out, tf.float32), [-1, channels]), expected,
                               atol=0.05)
