"""The vectorised ELBO and IW weights against a loop over y written with hand-coded densities."""

import numpy as np
import pytest
import tensorflow as tf

from cagem_tf import objective
from conftest import tiny_cagem


def normal_log_prob(z, loc, log_scale):
    return np.sum(-0.5 * ((z - loc) / np.exp(log_scale)) ** 2 - log_scale
                  - 0.5 * np.log(2 * np.pi), axis=-1)


def normal_kl_to_standard(loc, log_scale):
    return np.sum(0.5 * (np.exp(2 * log_scale) + loc ** 2 - 1) - log_scale, axis=-1)


def log_softmax(logits):
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def loop_over_y(model, x, terms):
    """ELBO [B] and IW log-weights [S,B] from a Python loop over the K clusters."""
    x = np.asarray(x, np.float64)
    z1, z2 = terms["z1"].numpy(), terms["z2"].numpy()                       # [S,B,d1], [K,S,B,d2]
    loc, log_scale = (t.numpy() for t in model.q_z1([x]))
    log_q_z1 = normal_log_prob(z1, loc, log_scale)                           # [S,B]
    log_q_y = log_softmax(model.q_y([z1, x]).numpy())                        # [S,B,K]
    elbo, log_w = -log_q_z1, []
    for k in range(model.num_clusters):
        y = np.zeros([1, 1, model.num_clusters], np.float32)
        y[..., k] = 1.0
        loc, log_scale = (t.numpy() for t in model.q_z2([y, z1, x] if model.spec.skip_connection
                                                        else [y, z1]))
        log_q_z2 = normal_log_prob(z2[k], loc, log_scale)
        kl_z2 = normal_kl_to_standard(loc, log_scale)
        log_p_z2 = normal_log_prob(z2[k], 0.0, 0.0)
        log_p_y = log_softmax(model.p_y([z2[k]]).numpy())[..., k]
        loc, log_scale = (t.numpy() for t in model.p_z1([y, z2[k]]))
        log_p_z1 = normal_log_prob(z1, loc, log_scale)
        logits = model.p_x([y, z1]).numpy()
        log_p_x = np.sum(x * logits - np.logaddexp(0.0, logits), axis=-1)
        q_k = np.exp(log_q_y[..., k])
        elbo = elbo + q_k * (log_p_x + log_p_z1 + log_p_y - kl_z2 - log_q_y[..., k])
        log_w.append(log_p_x + log_p_z1 + log_p_y + log_p_z2 - log_q_z2 - log_q_z1)
    return elbo.mean(0), np.logaddexp.reduce(np.stack(log_w), axis=0)


@pytest.mark.parametrize("num_clusters,num_samples,skip", [(2, 1, True), (3, 4, True),
                                                           (4, 2, False), (1, 3, True)])
def test_vectorised_elbo_equals_loop_over_y(num_clusters, num_samples, skip):
    model = tiny_cagem(num_clusters=num_clusters, z1_dim=3, z2_dim=2, skip_connection=skip)
    x = np.random.default_rng(0).integers(0, 2, size=(7, 5)).astype(np.float32)
    terms = model.latent_terms(x, num_samples, seed=tf.constant([4, 2]))
    elbo, log_w = loop_over_y(model, x, terms)
    np.testing.assert_allclose(objective.elbo(terms)["elbo"].numpy(), elbo, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(objective.iw_log_weights(terms).numpy(), log_w,
                               rtol=1e-5, atol=1e-5)


def test_elbo_parts_and_temperature():
    model = tiny_cagem(num_clusters=3)
    x = np.random.default_rng(1).integers(0, 2, size=(6, 5)).astype(np.float32)
    terms = model.latent_terms(x, 2, seed=tf.constant([1, 1]))
    parts = objective.elbo(terms, temperature=0.25)
    # Each part by hand from the enumerated terms: q(y) [K,S,B] weights, mean over S.
    q = np.transpose(tf.nn.softmax(terms["q_y_logits"]).numpy(), [2, 0, 1])
    expect = lambda t: np.mean(np.sum(q * np.asarray(t), 0), 0)  # noqa: E731
    log_px = expect(terms["log_p_x"])
    kl_z1 = np.mean(terms["log_q_z1"], 0) - expect(terms["log_p_z1"])
    kl_z2 = expect(terms["kl_z2"])
    kl_y = expect(np.log(q) - np.asarray(terms["log_p_y"]))
    for name, value in (("log_px", log_px), ("kl_z1", kl_z1), ("kl_z2", kl_z2), ("kl_y", kl_y)):
        np.testing.assert_allclose(parts[name], value, rtol=1e-5, atol=1e-5, err_msg=name)
    kl = kl_z1 + kl_z2 + kl_y
    np.testing.assert_allclose(parts["elbo"], log_px - kl, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(parts["objective"], log_px - 0.25 * kl, rtol=1e-5, atol=1e-5)
    assert np.all(parts["kl_z2"].numpy() > 0)  # an analytic KL


def test_alpha_and_cross_entropy():
    assert objective.alpha(0.1, 60000, 100) == pytest.approx(0.1 * 60100 / 100)
    assert objective.alpha(0.1, 60000, 0) == 0.0
    log_probs = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], np.float32))
    ce = objective.cross_entropy(tf.constant(log_probs), tf.constant([0, 2]))
    assert float(ce) == pytest.approx(-(np.log(0.7) + np.log(0.8)) / 2, rel=1e-6)


def test_training_losses_put_each_weighted_term_in_its_group_with_its_sign():
    values = {"objective": tf.constant(3.0), "h_labelled": tf.constant(2.0),
              "batch_usage": tf.constant(0.5), "h_pseudo": tf.constant(1.0),
              "h_z2_code": tf.constant(4.0), "h_labelled_elbo": tf.constant(7.0)}
    weights = {"label_weight": 10.0, "usage_weight": 2.0, "pseudo_weight": 3.0,
               "code_weight": 0.5, "labelled_elbo_weight": 0.25}
    losses = {k: float(v) for k, v in objective.training_losses(values, weights).items()}
    # The ELBO, the usage bonus and the labelled ELBO train everything; alpha (H_p + H_q) and
    # the pseudo-labels the classifiers; the z2 code q(z2|x,y,z1) and p(y|z2).
    assert losses == {"all": -3.0 - 2.0 * 0.5 + 0.25 * 7.0,
                      "classifiers": 10.0 * 2.0 + 3.0 * 1.0, "code": 0.5 * 4.0}
    assert {k: float(v) for k, v in objective.training_losses(values, weights, ()).items()} \
        == {"all": -3.0}
