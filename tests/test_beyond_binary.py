"""8-bit and colour images: the discretized logistic likelihood, channels, convolutional
networks; the maths and the shape contracts."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from cagem_tf import data, images, networks, objective
from cagem_tf.config import Config, ConfigError
from conftest import tiny_cagem

SHAPE, K, B, S = (8, 8, 3), 3, 4, 6
D = int(np.prod(SHAPE))


def _levels(n, shape=SHAPE, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape)).astype(np.float32) / 255


def test_the_discretized_logistic_sums_to_one_over_the_256_levels():
    net = networks.DiscretizedLogisticNet(6, [8], 1, name="p_x")
    u = tf.random.stateless_normal([3, 2], [1, 2])
    dist = net.distribution([u])                                      # batch [3], event [6]
    for head in net.heads:  # random scales from sharp to broad
        head.kernel.assign(tf.random.stateless_normal(head.kernel.shape, [3, 4]) * 2)
    dist = net.distribution([u])
    levels = tf.range(256, dtype=tf.float32)[:, None, None]          # [256,1,1]
    pixel = dist.distribution.log_prob(levels)                        # [256,3,6] per pixel
    np.testing.assert_allclose(tf.reduce_sum(tf.exp(pixel), 0).numpy(), 1.0, atol=1e-5)
    # Against the formula: F(k + 1/2) - F(k - 1/2) inside, the tails folded into 0 and 255.
    m, l = net([u])
    loc = 127.5 * (1 + m.numpy().astype(np.float64))
    scale = 127.5 * np.exp(10 * np.tanh(l.numpy().astype(np.float64) / 10))
    cdf = lambda v: 1 / (1 + np.exp(-(v - loc) / scale))
    k = np.arange(256, dtype=np.float64)[:, None, None]
    survival = lambda v: 1 / (1 + np.exp((v - loc) / scale))
    # Above the location the difference of survival functions keeps its digits.
    inside = np.where(k > loc, survival(k - 0.5) - survival(k + 0.5), cdf(k + 0.5) - cdf(k - 0.5))
    expected = np.where(k == 0, cdf(0.5), np.where(k == 255, survival(254.5), inside))
    np.testing.assert_allclose(tf.exp(pixel).numpy(), expected, atol=2e-5)
    # observe maps images in [0, 1] to their levels; the image's log p sums its pixels'.
    x = dist.sample(seed=tf.constant([5, 6])).numpy() / 255                     # [3,6]
    assert np.array_equal(net.observe(x).numpy(), np.round(x * 255))
    np.testing.assert_allclose(dist.log_prob(net.observe(x)).numpy(),
                               np.log(expected[np.round(x * 255).astype(int),
                                               np.arange(3)[:, None], np.arange(6)]).sum(-1),
                               rtol=1e-4)


def test_the_bernoulli_log_density_and_its_gradient_are_tfps():
    """x l - softplus(l) is TFP's Bernoulli log-density, value and gradient, for binary x and
    logits far into both tails."""
    rng = np.random.default_rng(0)
    logits = tf.constant(np.concatenate([rng.normal(0, 3, 500), [-40.0, -15.0, 15.0, 40.0]]),
                         tf.float32)
    x = tf.constant(rng.integers(0, 2, logits.shape[0]), tf.float32)
    values, grads = [], []
    for cls in (networks.Bernoulli, networks.tfd.Bernoulli):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            log_p = cls(logits=logits, dtype=tf.float32).log_prob(x)
        values.append(log_p)
        grads.append(tape.gradient(log_p, logits))
    np.testing.assert_allclose(values[0], values[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-6, atol=1e-6)
    assert np.all(np.isfinite(values[0]))


def test_bits_per_dimension_are_nats_over_d_ln_2():
    assert float(objective.bits_per_dim(-math.log(2) * 784 * 3, 784)) == pytest.approx(3.0)


@pytest.fixture(scope="module", params=["mlp", "conv"])
def colour_model(request):
    return tiny_cagem(image_shape=SHAPE, num_clusters=K, z1_dim=4, z2_dim=2,
                      architecture=request.param, likelihood="discretized_logistic")


@pytest.mark.parametrize("lead", [(B,), (S, B), (K, S, B)])
def test_colour_models_keep_the_distributions_shapes(colour_model, lead):
    m = colour_model
    x, z1 = tf.zeros(lead + (D,)), tf.zeros(lead + (4,))
    y = tf.one_hot(tf.zeros(lead, tf.int32), K)
    for name, dist, event in (("q_z1", m.q_z1.distribution([x]), [4]),
                              ("q_y", m.q_y.distribution([z1, x]), []),
                              ("q_z2", m.q_z2.distribution([y, z1, x]), [2]),
                              ("p_x", m.p_x.distribution([y, z1]), [D])):
        assert dist.batch_shape.as_list() == list(lead), name
        assert dist.event_shape.as_list() == event, name
        assert dist.log_prob(dist.sample(seed=tf.constant([1, 2]))).shape.as_list() == \
            list(lead), name


def test_colour_models_methods_answer_in_image_shape(colour_model):
    m, x = colour_model, _levels(B)
    terms = m.latent_terms(x, S, seed=tf.constant([1, 1]))
    assert terms["log_p_x"].shape.as_list() == [K, S, B]
    assert m.iw_bound(x, 30, seed=[1, 2]).shape.as_list() == [B]
    p_y, q_y = m.classify(x, seed=[1, 2])
    assert p_y.shape.as_list() == q_y.shape.as_list() == [B, K]
    mean, drawn, y = m.sample(5, seed=[3, 4], draw=True)
    assert mean.shape.as_list() == drawn.shape.as_list() == [5, *SHAPE]
    assert y.shape.as_list() == [5]
    levels = drawn.numpy() * 255  # samples are 8-bit levels / 255
    assert np.allclose(levels, np.round(levels), atol=1e-3) and 0 <= levels.min() <= 255
    assert 0 <= mean.numpy().min() and mean.numpy().max() <= 1
    assert m.reconstruct(x).shape.as_list() == [B, *SHAPE]
    assert [t.shape.as_list() for t in m.encode(x)] == [[B, 4], [B, 2]]


def test_a_conv_model_projects_x_once_per_example(monkeypatch):
    seen = []
    call = networks.ConvProjection.call

    def record(self, x, training=None, collect=True):
        seen.append(tuple(x.shape))
        return call(self, x, training, collect)

    monkeypatch.setattr(networks.ConvProjection, "call", record)
    m = tiny_cagem(image_shape=SHAPE, num_clusters=K, z1_dim=4, z2_dim=2, architecture="conv")
    seen.clear()
    m.iw_bound(_levels(B) > 0.5, 40, chunk_size=10, seed=[1, 2])
    m.class_log_probs(_levels(B) > 0.5, S, seed=[1, 2])
    # q(z1|x), q(y|z1,x) and q(z2|x,y,z1): three projections of x [B,D], whatever K and S.
    assert seen and set(seen) == {(B, D)} and len(seen) <= 6, seen


def test_a_conv_discretized_likelihood_upsamples_once_for_its_location_and_scale(monkeypatch):
    seen = []
    call = keras.layers.Conv2DTranspose.call

    def record(self, x):
        seen.append((self.name, tuple(x.shape)))
        return call(self, x)

    m = tiny_cagem(image_shape=SHAPE, num_clusters=K, z1_dim=4, z2_dim=2, architecture="conv",
                   likelihood="discretized_logistic")
    monkeypatch.setattr(keras.layers.Conv2DTranspose, "call", record)
    loc, log_scale = m.p_x([tf.eye(K)[:, None], tf.zeros([1, B, 4])])
    assert loc.shape.as_list() == log_scale.shape.as_list() == [K, B, D]
    # One shared upsampling of the K x B rows, then one last layer per head.
    assert [name for name, _ in seen] == ["up_0", "loc_up_1", "log_scale_up_1"], seen
    np.testing.assert_array_equal(log_scale.numpy(), 0.0)  # the scale head starts at zero


def test_colour_data_a_tinted_builder_and_one_line_errors(tmp_path):
    grey = data.Arrays(np.full((6, 4, 4, 1), 200, np.uint8), np.arange(6) % 2,
                       np.full((2, 4, 4, 1), 100, np.uint8), np.array([0, 1]), 2, "grey")
    tinted = data.tinted(grey, seed=1)
    assert tinted.x_train.shape == (6, 4, 4, 3) and tinted.name == "coloured:grey"
    assert np.array_equal(tinted.y_train, grey.y_train)
    assert np.array_equal(tinted.x_train.max(-1), grey.x_train[..., 0])  # full in one channel
    assert len({tuple(c) for c in tinted.x_train[:, 0, 0]}) == 6  # a colour per image
    np.savez(tmp_path / "rgb.npz", x_train=tinted.x_train, y_train=tinted.y_train,
             x_test=tinted.x_test, y_test=tinted.y_test)
    assert data.load(str(tmp_path / "rgb.npz")).image_shape == (4, 4, 3)
    np.savez(tmp_path / "bad.npz", x_train=np.full((6, 4, 4, 1), 300, np.int32),
             y_train=grey.y_train, x_test=grey.x_test, y_test=grey.y_test)
    with pytest.raises(data.DataError, match="integer images must lie in \\[0, 255\\]"):
        data.load(str(tmp_path / "bad.npz"))
    with pytest.raises(data.DataError, match="C = 1 \\(grey\\) or 3"):
        data._as_images(np.zeros((2, 4, 4, 2), np.uint8), "two channels")
    with pytest.raises(images.ImageError, match="the model takes \\(4, 4, 1\\)") as error:
        images.load(str(tmp_path / "rgb.npz"), (4, 4, 1))
    assert "\n" not in str(error.value)
    # 8-bit images as a discretized model sees them: levels / 255, not binarized.
    seen = data.observed(grey.x_test, "discretized_logistic", 0)
    assert np.allclose(seen, 100 / 255) and data.observed(grey.x_test, "bernoulli", 0).max() <= 1


@pytest.mark.parametrize("settings, message", [
    ({"likelihood": "gaussian"}, "--likelihood gaussian: use one of bernoulli, "
                                 "discretized_logistic"),
    ({"architecture": "resnet"}, "--architecture resnet: use one of mlp, conv")])
def test_an_unknown_likelihood_or_architecture_is_one_line(settings, message):
    with pytest.raises(ConfigError, match=message) as error:
        Config(**settings)
    assert "\n" not in str(error.value)


def test_conv_needs_heights_and_widths_in_multiples_of_four():
    with pytest.raises(ConfigError, match="multiples of 4"):
        tiny_cagem(image_shape=(6, 6, 1), architecture="conv")


SERVE = r"""
import json, sys
import numpy as np, tensorflow as tf
m = tf.saved_model.load(sys.argv[1])
x = tf.constant(np.load(sys.argv[2]))
out = {"likelihood": m.likelihood[0].numpy().decode(),
       "classify": {k: v.numpy().tolist() for k, v in m.signatures["classify"](x=x).items()},
       "sample": {k: v.numpy().tolist() for k, v in
                  m.signatures["sample"](seed=tf.constant([1, 2, 1], tf.int32)).items()},
       "likelihoods": {k: v.numpy().tolist() for k, v in m.signatures[sys.argv[3]](x=x).items()},
       "modules": sorted(k for k in sys.modules
                         if k.split(".")[0] in ("cagem_tf", "tensorflow_probability"))}
print("RESULT" + json.dumps(out))
"""


def _eight_bit_npz(path, shape, n_train=300, n_test=60):
    """Three clusters of smooth 8-bit images: a random prototype per class, per-pixel noise."""
    rng = np.random.default_rng(0)
    prototypes = rng.integers(30, 226, (3, *shape))
    y = np.arange(n_train + n_test) % 3
    x = np.clip(prototypes[y] + rng.normal(0, 12, (len(y), *shape)), 0, 255).astype(np.uint8)
    np.savez(path, x_train=x[:n_train], y_train=y[:n_train], x_test=x[n_train:],
             y_test=y[n_train:])
    return str(path)


@pytest.mark.e2e
@pytest.mark.parametrize("shape, architecture", [((32, 32, 3), "conv"), ((12, 12, 1), "mlp")])
def test_an_8bit_run_trains_evaluates_exports_and_serves_with_tensorflow_alone(
        tmp_path, shape, architecture):
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    dataset, run = _eight_bit_npz(tmp_path / "data.npz", shape), str(tmp_path / "run")
    train = subprocess.run(
        [sys.executable, "train/main.py", f"--dataset={dataset}", f"--model_dir={run}",
         "--likelihood=discretized_logistic", f"--architecture={architecture}", "--epochs=1",
         "--labels=6", "--hidden_lower=16", "--hidden_upper=16", "--z1_dim=4", "--z2_dim=2",
         "--batch_size=50", "--eval_every=1", "--eval_iw_samples=5", "--eval_subset=20",
         "--export_iw_samples=5", "--verbose=2"],
        cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "bits_per_dim" in train.stdout + train.stderr  # the epoch's log lines
    evaluate = subprocess.run(
        [sys.executable, "train/evaluate.py", f"--model_dir={run}", "--eval_iw_samples=5",
         "--eval_subset=20", "--nofigures"],
        cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    results = json.load(open(os.path.join(run, "evaluation", "results.json")))
    bound = results["bounds"]["5"]
    assert bound["bits_per_dim"] == pytest.approx(
        -bound["mean"] / (np.prod(shape) * math.log(2)), rel=1e-6)
    assert 0 < bound["bits_per_dim"] < 16  # one epoch of 6 steps: near 8 bits, a uniform pmf
    assert "bits per dimension" in open(os.path.join(run, "evaluation", "results.md")).read()
    x = np.load(dataset)["x_test"][:4].astype(np.float32) / 255
    np.save(tmp_path / "x.npy", x)
    served = subprocess.run([sys.executable, "-c", SERVE, os.path.join(run, "export", "1"),
                             str(tmp_path / "x.npy"), "log_likelihood_5"],
                            env=env, capture_output=True, text=True, timeout=600, cwd="/")
    lines = [l for l in served.stdout.splitlines() if l.startswith("RESULT")]
    assert lines, served.stderr[-3000:]
    out = json.loads(lines[0][len("RESULT"):])
    assert out["likelihood"] == "discretized_logistic" and out["modules"] == []
    assert np.array(out["classify"]["q_y"]).shape == (4, 3)
    for key in ("probs", "images"):
        assert np.array(out["sample"][key]).shape == (3, *shape)
    levels = np.array(out["sample"]["images"]) * 255
    assert np.allclose(levels, np.round(levels), atol=1e-3)  # 8-bit samples, not binary
    assert len(np.unique(np.round(levels))) > 2
    assert out["sample"]["images"][0] == out["sample"]["images"][2]  # the same seed
    assert np.all(np.isfinite(out["likelihoods"]["log_likelihood"]))
