"""Evaluation measures: active units, KL per unit, and the metrics of a periodic evaluation."""

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp


tfd = tfp.distributions

ACTIVE_THRESHOLD = 0.01


def active_units(means, threshold: float = ACTIVE_THRESHOLD):
    """IWAE's criterion: unit d is active when Cov_x(E_q[z_d|x]) > threshold.

    means: [N,d] posterior means over a set of inputs. Returns (count, per-unit variance [d]).
    """
    variance = np.var(np.asarray(means, np.float64), axis=0)
    return int(np.sum(variance > threshold)), variance


def kl_per_unit(model, x, seed):
    """Mean over x of the KL terms per unit, ([d1], [d2]), weighted by q(y|z1,x).

    z2: sum_y q(y|z1,x) KL[q(z2_d|x,y,z1) || N(0,1)] (analytic, per dimension).
    z1: log q(z1_d|x) - sum_y q(y|z1,x) log p(z1_d|y,z2^y) at one sample (the diagonal
    Gaussians factorise over units, so these per-unit terms sum to kl_z1 of the ELBO).
    """
    terms = model.latent_terms(x, 1, seed)
    x = model.flatten(x)
    z1, z2 = terms["z1"], terms["z2"]                                       # [1,B,d1], [K,1,B,d2]
    q_y = tf.transpose(tf.nn.softmax(terms["q_y_logits"]), [2, 0, 1])[..., None]  # [K,1,B,1]
    loc, log_scale = model.q_z1([x])
    log_q_z1 = tfd.Normal(loc, tf.exp(log_scale)).log_prob(z1)              # [1,B,d1]
    y = model.clusters(2)
    loc, log_scale = model.p_z1([y, z2])
    log_p_z1 = tfd.Normal(loc, tf.exp(log_scale)).log_prob(z1)              # [K,1,B,d1]
    kl_z1 = log_q_z1[0] - tf.reduce_sum(q_y * log_p_z1, axis=0)[0]
    loc, log_scale = model.q_z2(model.q_z2_inputs(y, z1, x))
    kl_z2 = tfd.kl_divergence(tfd.Normal(loc, tf.exp(log_scale)), tfd.Normal(0.0, 1.0))
    kl_z2 = tf.reduce_sum(q_y * kl_z2, axis=0)[0]                           # [B,d2]
    return tf.reduce_mean(kl_z1, 0).numpy(), tf.reduce_mean(kl_z2, 0).numpy()


def periodic_metrics(model, x, y, iw_samples: int, seed: int = 0, batch_size: int = 250,
                     iw_chunk: int = 100):
    """The metrics of one evaluation on fixed images x [N,...] with labels y [N].

    Returns a dict of floats (ELBO parts, iw_bound, errors of p(y|x) and q(y|x), active units,
    kl per layer) and arrays (kl_z1_per_unit, kl_z2_per_unit, z2_means).
    """
    sums, z1_means, z2_means, kl1, kl2 = {}, [], [], [], []
    n = len(x)
    for start in range(0, n, batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        s = tf.constant([seed, start], tf.int32)
        parts = model.elbo(xb, seed=s)
        values = {k: parts[k] for k in ("elbo", "log_px", "kl_z1", "kl_z2", "kl_y")}
        if iw_samples > 0:
            values["iw_bound"] = model.iw_bound(xb, iw_samples, iw_chunk, seed=s + 1)
        p_y, q_y = model.classify(xb, seed=s + 2)
        values["error_p"] = tf.cast(tf.argmax(p_y, -1) != yb, tf.float32)
        values["error_q"] = tf.cast(tf.argmax(q_y, -1) != yb, tf.float32)
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + float(tf.reduce_sum(v))
        z1, z2 = model.encode(xb)
        z1_means.append(z1.numpy())
        z2_means.append(z2.numpy())
        a, b = kl_per_unit(model, xb, s + 3)
        kl1.append(a * len(xb))
        kl2.append(b * len(xb))
    metrics = {k: v / n for k, v in sums.items()}
    z1_means, z2_means = np.concatenate(z1_means), np.concatenate(z2_means)
    metrics["active_units_z1"] = active_units(z1_means)[0]
    metrics["active_units_z2"] = active_units(z2_means)[0]
    metrics["kl_z1_per_unit"] = np.sum(kl1, 0) / n
    metrics["kl_z2_per_unit"] = np.sum(kl2, 0) / n
    metrics["z2_means"] = z2_means
    return metrics
