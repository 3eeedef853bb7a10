"""Shape contracts: batch and event shapes of every distribution, and of the model's methods."""

import contextlib

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from cagem_tf.model import BY_CLASS_ACTIVATIONS
from conftest import tiny_cagem

K, D, D1, D2, B, S = 3, 5, 4, 2, 7, 6


@pytest.fixture(scope="module")
def model():
    return tiny_cagem(num_clusters=K, z1_dim=D1, z2_dim=D2)


def _loc_scale(out):
    loc, log_scale = out
    return loc, tf.exp(log_scale)


def _x(n=B):
    return tf.constant(np.random.default_rng(0).integers(0, 2, (n, D)), tf.float32)


def _y(lead):
    return tf.one_hot(tf.zeros(lead, tf.int32), K)


@pytest.mark.parametrize("lead", [(B,), (S, B), (K, S, B)])
def test_distribution_shapes(model, lead):
    x, z1, z2, y = tf.zeros(lead + (D,)), tf.zeros(lead + (D1,)), tf.zeros(lead + (D2,)), _y(lead)
    cases = {
        "q_z1": (model.q_z1.distribution([x]), [D1]),
        "q_y": (model.q_y.distribution([z1, x]), []),
        "q_z2": (model.q_z2.distribution([y, z1, x]), [D2]),
        "p_y": (model.p_y.distribution([z2]), []),
        "p_z1": (model.p_z1.distribution([y, z2]), [D1]),
        "p_x": (model.p_x.distribution([y, z1]), [D]),
    }
    for name, (dist, event) in cases.items():
        assert dist.batch_shape.as_list() == list(lead), name
        assert dist.event_shape.as_list() == event, name
        sample = dist.sample(2, seed=tf.constant([1, 2]))
        assert sample.shape.as_list() == [2, *lead, *event], name
        assert dist.log_prob(sample).shape.as_list() == [2, *lead], name


def test_broadcast_inputs_project_once(model):
    """y [K,1,1,K] with z1 [S,B,d1] and x [B,D] broadcast to [K,S,B]."""
    dist = model.q_z2.distribution([model.clusters(2), tf.zeros([S, B, D1]), _x()])
    assert dist.batch_shape.as_list() == [K, S, B]


def test_projected_inputs_match_direct_call(model):
    """A projection of x computed once [B,H] and passed as `projected` gives the same outputs as
    the direct call, for every input layout the bound uses."""
    x, z1 = _x(), tf.random.stateless_normal([S, B, D1], [0, 4])
    direct = model.q_y([z1, x])
    reused = model.q_y([z1, None], projected=model.q_y.project([None, x]))
    assert reused.shape.as_list() == [S, B, K]
    np.testing.assert_allclose(reused, direct, rtol=1e-6, atol=1e-6)
    y = model.clusters(2)
    loc, log_scale = model.q_z2([y, z1, x])
    loc2, log_scale2 = model.q_z2([y, z1, None], projected=model.q_z2.project([None, None, x]))
    np.testing.assert_allclose(loc2, loc, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(log_scale2, log_scale, rtol=1e-6, atol=1e-6)
    assert loc.shape.as_list() == [K, S, B, D2]


def test_latent_terms_layout(model):
    terms = model.latent_terms(_x(), S, seed=tf.constant([0, 1]))
    expected = {"z1": [S, B, D1], "z2": [K, S, B, D2], "log_q_z1": [S, B],
                "q_y_logits": [S, B, K]}
    for name in ("log_q_z2", "kl_z2", "log_p_z2", "log_p_y", "log_p_z1", "log_p_x"):
        expected[name] = [K, S, B]
    assert {k: v.shape.as_list() for k, v in terms.items()} == expected


def test_method_shapes(model):
    x = _x()
    assert {k: v.shape.as_list() for k, v in model.elbo(x).items()} == {
        k: [B] for k in ("elbo", "objective", "log_px", "kl_z1", "kl_z2", "kl_y")}
    assert model.iw_bound(x, num_samples=30, chunk_size=7).shape.as_list() == [B]
    p_y, q_y = model.classify(x, num_samples=4)
    assert p_y.shape.as_list() == q_y.shape.as_list() == [B, K]
    np.testing.assert_allclose(tf.reduce_sum(p_y, -1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(tf.reduce_sum(q_y, -1), 1.0, rtol=1e-5)
    probs, y = model.sample(9)
    assert probs.shape.as_list() == [9, D] and y.shape.as_list() == [9] and y.dtype == tf.int32
    probs, y = model.sample(3, y=tf.constant([2, 0, 1]))
    assert y.numpy().tolist() == [2, 0, 1]
    z1, z2 = model.encode(x)
    assert z1.shape.as_list() == [B, D1] and z2.shape.as_list() == [B, D2]
    assert model.reconstruct(x).shape.as_list() == [B, D]


def test_image_shape_is_kept():
    model = tiny_cagem(image_shape=(2, 3, 1))
    x = tf.zeros([4, 2, 3, 1])
    assert model.sample(4)[0].shape.as_list() == [4, 2, 3, 1]
    assert model.reconstruct(x).shape.as_list() == [4, 2, 3, 1]
    assert model.elbo(x)["elbo"].shape.as_list() == [4]


def test_one_cluster_is_a_two_layer_vae():
    """K=1: q(y|z1,x) = p(y|z2) = 1, so kl_y = 0 and the ELBO is that of a two-layer VAE."""
    model = tiny_cagem(num_clusters=1)
    x = _x()
    parts = model.elbo(x, num_samples=3, seed=tf.constant([0, 0]))
    np.testing.assert_allclose(parts["kl_y"], 0.0, atol=1e-6)
    # The ELBO of the two-layer VAE p(x|z1) p(z1|z2) p(z2), q(z2|x,z1) q(z1|x), written out
    # with TFP densities on the same draws: log p(x|z1) + log p(z1|z2) - log q(z1|x) - KL(z2).
    tfd = tfp.distributions
    terms = model.latent_terms(x, 3, seed=tf.constant([0, 0]))
    z1, z2 = terms["z1"], terms["z2"][0]                                   # [S,B,d1], [S,B,d2]
    one = tf.ones([*z1.shape[:2], 1])
    flat = model.flatten(x)
    q_z1 = tfd.MultivariateNormalDiag(*_loc_scale(model.q_z1([flat])))
    q_z2 = tfd.MultivariateNormalDiag(*_loc_scale(model.q_z2(model.q_z2_inputs(
        one, z1, flat * tf.ones([z1.shape[0], 1, 1])))))
    p_z1 = tfd.MultivariateNormalDiag(*_loc_scale(model.p_z1([one, z2])))
    p_x = tfd.Independent(tfd.Bernoulli(logits=model.p_x([one, z1])), 1)
    p_z2 = tfd.MultivariateNormalDiag(tf.zeros(z2.shape[-1]))
    vae = (p_x.log_prob(flat) + p_z1.log_prob(z1) - q_z1.log_prob(z1)
           - tfd.kl_divergence(q_z2, p_z2))
    np.testing.assert_allclose(parts["elbo"], tf.reduce_mean(vae, 0), rtol=1e-4, atol=1e-4)


def test_different_number_of_clusters_unsupervised():
    model = tiny_cagem(num_clusters=7)
    assert model.elbo(_x())["elbo"].shape.as_list() == [B]
    assert model.classify(_x(), 2)[0].shape.as_list() == [B, 7]


@pytest.mark.parametrize("estimator", ["exact", "sampled"])
def test_the_row_independent_iw_bound_answers_a_row_in_a_batch_as_it_answers_it_alone(estimator):
    model, x, seed = tiny_cagem(num_clusters=K), _x(B), tf.constant([3, 4])
    # Compiled, as the export serves it (eager loops over chunks cost about 1 s a call).
    iw = tf.function(lambda rows, samples, chunk, independent: model.iw_bound(
        rows, samples, chunk, seed, estimator, row_independent=independent))
    batch = iw(x, 30, 8, True).numpy()
    for i in range(B):
        np.testing.assert_allclose(batch[i], iw(x[i:i + 1], 30, 8, True).numpy()[0], atol=1e-5)
    default = iw(x, 30, 8, False).numpy()
    assert not np.allclose(default[1], iw(x[1:2], 30, 8, False).numpy()[0])
    # The same estimator either way: with q near the posterior (heads halved, as in
    # test_exactness) the two bounds agree within their Monte Carlo noise.
    for net in (model.q_z1, model.q_y, model.q_z2, model.p_y, model.p_z1, model.p_x):
        for head in net.heads:
            head.kernel.assign(0.5 * head.kernel)
    shared = iw(x, 5000, 500, True).numpy()
    own = iw(x, 5000, 500, False).numpy()
    np.testing.assert_allclose(shared, own, atol=0.3)       # per image: about 0.1 of noise
    assert abs(shared.mean() - own.mean()) < 0.1


def test_rows_sample_from_their_own_seeds_alone_as_in_a_batch():
    model = tiny_cagem(num_clusters=K)
    seeds = tf.constant([[5, 0], [6, 0], [7, 0], [5, 0]])
    mean, x, y = model.sample(4, noise=model.row_noise(seeds), draw=True)
    for i in range(4):
        alone = model.sample(1, seed=seeds[i], draw=True)
        for together, single in zip((mean, x, y), alone):
            np.testing.assert_allclose(together.numpy()[i], single.numpy()[0], atol=1e-6)
    np.testing.assert_allclose(mean[0], mean[3], atol=1e-6)   # the same seed twice
    assert not np.allclose(mean[0], mean[1])


def test_sampled_clusters_follow_p_y_given_z2():
    """Gumbel-max on standard noise: y ~ Cat(softmax(logits of p(y|z2))) for z2 ~ p(z2)."""
    model, n = tiny_cagem(num_clusters=K), 40000
    _, y = model.sample(n, seed=tf.constant([1, 9]))
    z2 = tf.random.stateless_normal([n, model.spec.z2_dim], [2, 3])
    expected = tf.reduce_mean(tf.nn.softmax(model.p_y([z2])), 0).numpy()
    observed = np.bincount(y.numpy(), minlength=K) / n
    np.testing.assert_allclose(observed, expected, atol=4 * np.sqrt(0.25 / n) + 0.005)


def test_the_row_independent_classifier_answers_a_row_in_a_batch_as_it_answers_it_alone():
    model, x, seed = tiny_cagem(num_clusters=K), _x(B), tf.constant([3, 4])
    batch = [t.numpy() for t in model.classify(x, seed=seed, row_independent=True)]
    for i in range(B):
        alone = model.classify(x[i:i + 1], seed=seed, row_independent=True)
        for together, single in zip(batch, alone):
            np.testing.assert_allclose(together[i], single[0], atol=1e-6)
    # The default draws are per example: there a row's answer depends on its place.
    default = model.classify(x, seed=seed)[0].numpy()
    assert not np.allclose(default[1], model.classify(x[1:2], seed=seed)[0].numpy()[0])
    # q(y|x) is the same estimator either way (S = 2000 draws: within Monte Carlo noise).
    np.testing.assert_allclose(model.classify(x, 2000, seed, row_independent=True)[1],
                               model.classify(x, 2000, seed)[1], atol=0.05)


def test_a_large_batch_classified_class_by_class_answers_as_all_classes_at_once():
    """Past `BY_CLASS_ACTIVATIONS` the row-independent cascade runs one class per loop
    iteration: every row gets the p(y|x) and q(y|x) that small batches (all classes at once)
    give it, also with batch norm folded."""
    model = tiny_cagem(num_clusters=K)
    S, H = model.spec.classifier_samples, max(model.spec.hidden_upper)
    n, block = BY_CLASS_ACTIVATIONS // (K * S * H) + 1, 1024
    assert K * S * block * H <= BY_CLASS_ACTIVATIONS < K * S * n * H
    x = tf.constant(np.random.default_rng(1).integers(0, 2, (n, D)), tf.float32)
    seed = tf.constant([3, 4])
    for fold in (False, True):
        with model.folded_batch_norm() if fold else contextlib.nullcontext():
            large = model.classify(x, seed=seed, row_independent=True)
            small = [model.classify(x[i:i + block], seed=seed, row_independent=True)
                     for i in range(0, n, block)]
        for k, large_k in enumerate(large):
            np.testing.assert_allclose(large_k, tf.concat([s[k] for s in small], 0), atol=1e-6)


def test_batch_norm_folded_into_the_weights_computes_the_same_networks_until_unfolded():
    """Inside `folded_batch_norm` every network in inference is ReLU(u (W s) + t) per layer:
    the same outputs as batch norm with the moving statistics, for every input layout (a
    precomputed projection of x too); training ignores the fold, and leaving the block undoes it."""
    model = tiny_cagem(num_clusters=K, z1_dim=D1, z2_dim=D2)
    rng = np.random.default_rng(3)
    for name in ("q_z1", "q_y", "q_z2", "p_y", "p_z1", "p_x"):
        for norm in getattr(model, name).norms:   # statistics far from 0 and 1
            norm.moving_mean.assign(rng.normal(size=norm.moving_mean.shape))
            norm.moving_variance.assign(rng.uniform(0.3, 3.0, size=norm.moving_variance.shape))
            norm.gamma.assign(rng.uniform(0.5, 2.0, size=norm.gamma.shape))
            norm.beta.assign(rng.normal(size=norm.beta.shape))
    x, z1 = _x(), tf.random.stateless_normal([S, B, D1], [0, 4])
    z2, y = tf.random.stateless_normal([K, S, B, D2], [0, 5]), model.clusters(2)
    calls = {"q_z1": lambda: model.q_z1([x]), "q_y": lambda: model.q_y([z1, x]),
             "q_y, x projected": lambda: model.q_y([z1, None],
                                                  projected=model.q_y.project([None, x])),
             "q_z2": lambda: model.q_z2([y, z1, x]), "p_y": lambda: model.p_y([z2]),
             "p_z1": lambda: model.p_z1([y, z2]), "p_x": lambda: model.p_x([y, z1])}
    plain = {k: tf.nest.flatten(f()) for k, f in calls.items()}
    train_plain = model.q_z2([y, z1, x], training=True, collect=False)
    with model.folded_batch_norm() as folded:
        assert len(folded) > 0
        for k, f in calls.items():
            for a, b in zip(tf.nest.flatten(f()), plain[k]):
                assert a.shape == b.shape, k
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=k)
        for a, b in zip(model.q_z2([y, z1, x], training=True, collect=False), train_plain):
            np.testing.assert_array_equal(a, b)
        model.p_x.norms[0].moving_mean.assign_add(tf.ones_like(model.p_x.norms[0].moving_mean))
        # a snapshot: the fold does not follow the weights
        np.testing.assert_allclose(model.p_x([y, z1]), plain["p_x"][0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(model.p_x([y, z1]), plain["p_x"][0], atol=1e-3)
