"""The ELBO and the importance-weighted bound against log p(x) computed by quadrature.

For a tiny CaGeM (5 pixels, z1 and z2 one-dimensional, K=2),
  p(x) = sum_y int dz2 N(z2;0,1) p(y|z2) int dz1 p(z1|y,z2) p(x|y,z1)
is computed on a fine grid, for 32 images at once: all the binary ones for the Bernoulli
likelihood, 32 random 8-bit images for the discretized logistic. Every test runs for both.
"""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from cagem_tf import evaluation, objective
from conftest import tiny_cagem


def _all_binary_images(d):
    return np.array(list(itertools.product([0.0, 1.0], repeat=d)), np.float32)


def exact_log_px(model, xs, z2_step=0.0025, chunk=400, per_y=False):
    """log p(x) [N] (per_y: log p(x,y) [K,N]) by Riemann sums over (z1, z2) grids.

    The z1 step is a quarter of the smallest scale of p(z1|y,z2), where a Riemann sum of a
    Gaussian is exact to double precision; the z2 step is fine enough for the kinks of the ReLU
    networks (error O(step^2)).
    """
    z2 = np.arange(-8.5, 8.5 + z2_step / 2, z2_step)
    z2_in = z2.astype(np.float32)[:, None]
    y = model.clusters(1)                                                     # [K,1,K]
    loc, log_scale = (t.numpy()[..., 0].astype(np.float64)
                      for t in model.p_z1([y, z2_in[None]]))                  # [K,n2]
    scale = np.exp(log_scale)
    z1_step = scale.min() / 4
    z1 = np.arange((loc - 10 * scale).min(), (loc + 10 * scale).max(), z1_step)
    log_p_y = tf.nn.log_softmax(model.p_y([z2_in])).numpy().T.astype(np.float64)  # [K,n2]
    log_p_z2 = -0.5 * z2 ** 2 - 0.5 * np.log(2 * np.pi)
    # p(x|y,z1) for every image: [K,n1,N]
    p_x_given = model.p_x.distribution([y, z1[None, :, None].astype(np.float32)])  # [K,n1]
    observed = model.p_x.observe(tf.constant(xs))[:, None, None, :]               # [N,1,1,D]
    p_x = np.exp(np.transpose(p_x_given.log_prob(observed).numpy().astype(np.float64),
                              [1, 2, 0]))
    total = np.zeros([len(y), len(xs)])
    for start in range(0, len(z2), chunk):
        part = slice(start, start + chunk)
        log_p_z1 = (-0.5 * ((z1[None, None, :] - loc[:, part, None]) / scale[:, part, None]) ** 2
                    - np.log(scale[:, part, None]) - 0.5 * np.log(2 * np.pi))  # [K,c,n1]
        inner = np.einsum("kab,kbn->kan", np.exp(log_p_z1), p_x) * z1_step     # [K,c,N]
        total += np.einsum("ka,kan->kn", np.exp(log_p_y[:, part] + log_p_z2[None, part]),
                           inner)
    return np.log(total * z2_step) if per_y else np.log(total.sum(0) * z2_step)


@pytest.fixture(scope="module", params=["bernoulli", "discretized_logistic"])
def model(request):
    """A random tiny CaGeM with its output-head weights halved: its posterior stays near enough
    to q that importance sampling with 5000 draws has a usable variance (with full-size random
    heads p(z1|y,z2) can form thin ridges that no fixed q reaches). The discretized logistic's
    scales start near 47 levels (not 127), so that p(x|y,z1) depends on z1 and y."""
    model = tiny_cagem(seed=6, likelihood=request.param)
    for net in (model.q_z1, model.q_y, model.q_z2, model.p_y, model.p_z1, model.p_x):
        for head in net.heads:
            head.kernel.assign(0.5 * head.kernel)
    if request.param == "discretized_logistic":
        model.p_x.heads[1].bias.assign(np.full([5], -1.0, np.float32))
    return model


@pytest.fixture(scope="module")
def exact(model):
    if model.spec.likelihood == "bernoulli":
        xs = _all_binary_images(5)
    else:
        xs = np.random.default_rng(0).integers(0, 256, (32, 5)).astype(np.float32) / 255
    return xs, exact_log_px(model, xs)


def test_quadrature_normalises(model, exact):
    """Over all 32 binary images p(x) sums to 1; over 8-bit images, p(x) of one image is the
    sum over y of the quadratures of p(x,y)."""
    xs, log_px = exact
    if model.spec.likelihood == "bernoulli":
        assert abs(np.exp(log_px).sum() - 1.0) < 1e-4
    np.testing.assert_allclose(np.logaddexp.reduce(exact_log_px(model, xs, per_y=True), 0),
                               log_px, rtol=1e-9)


def test_iw_5000_matches_exact(model, exact):
    xs, log_px = exact
    chosen = [0, 7, 13, 22, 31]
    log_w = objective.iw_log_weights(
        model.latent_terms(xs[chosen], num_samples=5000, seed=tf.constant([1, 2]))).numpy()
    estimate = objective.log_mean_exp(log_w).numpy()
    w = np.exp(log_w - log_w.max(0))
    stderr = w.std(0) / (np.sqrt(len(w)) * w.mean(0))  # delta method for log of a mean
    error = np.abs(estimate - log_px[chosen])
    assert np.all(error < 3 * stderr + 1e-4), (estimate, log_px[chosen], stderr)
    assert np.all(error < 0.05)


def test_chunked_iw_bound_equals_one_chunk(model, exact):
    """Chunks of 64 with a masked remainder give the same bound as the formula on all samples."""
    xs, _ = exact
    seed = tf.constant([5, 6])
    chunked = model.iw_bound(xs[:4], num_samples=200, chunk_size=64, seed=seed).numpy()
    pieces = [objective.iw_log_weights(model.latent_terms(
        xs[:4], 64, tf.random.experimental.stateless_fold_in(seed, i))) for i in range(4)]
    direct = objective.log_mean_exp(tf.concat(pieces, 0)[:200]).numpy()
    np.testing.assert_allclose(chunked, direct, rtol=1e-5)


def test_bounds_are_ordered(model, exact):
    """ELBO <= IW_1 <= IW_10 <= IW_1000 <= log p(x), each mean up to 3 standard errors."""
    xs, log_px = exact
    chosen = [5, 22]
    x = xs[chosen]

    def mean_bound(k, repeats, seed):
        log_w = objective.iw_log_weights(
            model.latent_terms(x, k * repeats, tf.constant(seed))).numpy()
        bounds = objective.log_mean_exp(log_w.reshape(repeats, k, -1), axis=1).numpy()
        return bounds.mean(0), bounds.std(0) / np.sqrt(repeats)

    parts = model.elbo(x, num_samples=20000, seed=tf.constant([9, 9]))
    per_sample_elbo = parts["elbo"].numpy()
    # The analytic sum over y against plain Monte Carlo of E_q[log p(x,y,z1,z2) - log q] with
    # y drawn (sampled_log_weights): the same ELBO by another route, up to its noise.
    drawn = objective.sampled_log_weights(model.sampled_terms(x, 20000, tf.constant([8, 8])))
    drawn = drawn.numpy()
    np.testing.assert_allclose(per_sample_elbo, drawn.mean(0),
                               atol=4 * drawn.std(0).max() / np.sqrt(20000) + 1e-3)
    iw1, se1 = mean_bound(1, 20000, [1, 1])
    iw10, se10 = mean_bound(10, 2000, [2, 2])
    iw1000, se1000 = mean_bound(1000, 40, [3, 3])
    elbo = per_sample_elbo
    assert np.all(elbo < log_px[chosen] - 0.01), "the ELBO must be strictly below log p(x)"
    assert np.all(elbo <= iw1 + 3 * se1)
    assert np.all(iw1 <= iw10 + 3 * (se1 + se10))
    assert np.all(iw10 <= iw1000 + 3 * (se10 + se1000))
    assert np.all(iw1000 <= log_px[chosen] + 3 * se1000 + 1e-4)
    assert np.all(np.abs(iw1000 - log_px[chosen]) < 0.05)


def test_sampled_y_estimator_matches_exact(model, exact):
    """Drawing y ~ q(y|z1,x) inside each weight is also unbiased for p(x)."""
    xs, log_px = exact
    chosen = [0, 7, 13, 22, 31]
    log_w = model.sampled_log_weights(xs[chosen], 20000, seed=tf.constant([4, 4])).numpy()
    estimate = objective.log_mean_exp(log_w).numpy()
    w = np.exp(log_w - log_w.max(0))
    stderr = w.std(0) / (np.sqrt(len(w)) * w.mean(0))
    error = np.abs(estimate - log_px[chosen])
    assert np.all(error < 3 * stderr + 1e-4), (estimate, log_px[chosen], stderr)
    assert np.all(error < 0.05)
    chunked = model.iw_bound(xs[chosen], 20000, 1000, seed=tf.constant([4, 4]),
                             estimator="sampled").numpy()
    assert np.all(np.abs(chunked - log_px[chosen]) < 0.05)


def test_estimator_comparison_converges_to_log_px(model, exact):
    """compare_estimators: both estimators approach log p(x) as S grows, their spread between
    seeds shrinks, and the table pairs each row with the first."""
    xs, log_px = exact
    chosen = [0, 7, 13, 22]
    rows = [("exact", 3000), ("sampled", 3000), ("exact", 3), ("sampled", 3)]
    results = evaluation.compare_estimators(model, xs[chosen], rows, repeats=3, batch_size=2)
    assert [(e, s) for e, s, _, _ in results] == rows
    spread = {}
    for estimator, s, values, seconds in results:
        assert values.shape == (3, 4) and seconds > 0
        spread[estimator, s] = values.std(0, ddof=1).mean()
        if s == 3000:
            assert np.all(np.abs(values.mean(0) - log_px[chosen]) < 0.05)
    for estimator in ("exact", "sampled"):
        assert spread[estimator, 3] > 3 * spread[estimator, 3000] > 0
    table = evaluation.estimators_markdown(results).splitlines()
    assert len(table) == 6 and "+0.000 ± 0.000" in table[2]


def test_the_importance_sampled_posterior_is_the_models_own_p_of_y_given_x(model, exact):
    xs, _ = exact
    log_joint = exact_log_px(model, xs, per_y=True)                         # [K,N]
    exact_posterior = np.exp(log_joint - np.logaddexp.reduce(log_joint, 0)).T
    estimate = np.exp(model.posterior_log_probs(xs, 5000, 1000, seed=tf.constant([2, 3])))
    np.testing.assert_allclose(estimate.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(estimate, exact_posterior, atol=0.03)  # IS noise at S = 5000
    assert np.abs(estimate - exact_posterior).mean() < 0.01
    # The cascade, which reads y from z2 alone, approximates another quantity: it fails this.
    _, cascade = model.class_log_probs(xs, 200, seed=tf.constant([2, 3]))
    assert np.abs(np.exp(cascade.numpy()) - exact_posterior).mean() > 0.02
