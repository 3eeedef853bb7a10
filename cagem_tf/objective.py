"""The CaGeM objectives, computed from the enumerated log-densities of `CaGeM.latent_terms`.

Shapes: K clusters, S samples of z1, B examples. The terms are
  z1 [S,B,d1], z2 [K,S,B,d2]  the samples themselves
  log_q_z1 [S,B]      log q(z1_s|x)
  q_y_logits [S,B,K]  logits of q(y|z1_s,x)
  log_q_z2 [K,S,B]    log q(z2_s^y|x,y,z1_s), z2_s^y drawn for every y
  kl_z2 [K,S,B]       KL[q(z2|x,y,z1_s) || p(z2)], analytic
  log_p_z2, log_p_y, log_p_z1, log_p_x [K,S,B]
                      log p(z2^y), log p(y|z2^y), log p(z1|y,z2^y), log p(x|y,z1)
With y drawn instead (`CaGeM.sampled_terms`, for `sampled_log_weights`) every term is [S,B]:
  log_q_z1, log_q_y, log_q_z2, log_p_x, log_p_z1, log_p_y, log_p_z2 at (z1_s, y_s, z2_s).

The training loss of one step (`training_losses`) is -mean_b objective(x_b) (the ELBO under the
KL warm-up) plus the weighted terms below, each a scalar of the step, weighed by one of the
model's scalar variables (moved by a schedule) and reaching only the variables of its group
("all"; "classifiers": p(y|z2) and q(y|z1,x); "code": q(z2|x,y,z1) and p(y|z2)):
  term         weight         group        sign  what
  h_labelled   label_weight   classifiers  +1    H_p + H_q, the cross-entropies of p(y|x) and
                                                 q(y|x) on the labelled batch (the paper;
                                                 the weight is alpha)
  batch_usage  usage_weight   all          -1    DEPARTURE: the batch's cluster entropy
                                                 (`batch_usage`), a bonus
  h_pseudo     pseudo_weight  classifiers  +1    DEPARTURE: -log q(y'|z1,x) for the k-means
                                                 label y' of each unlabelled image
  h_z2_code    code_weight    code         +1    DEPARTURE: `z2_code`
  h_labelled_elbo  labelled_elbo_weight  all  +1  DEPARTURE: -F(x_l, y_l), the labelled batch's
                                                 ELBO with y set to its label
                                                 (`labelled_elbo`)
"""

import collections
import math

import tensorflow as tf

WeightedTerm = collections.namedtuple("WeightedTerm", "name weight group sign")
WEIGHTED_TERMS = (
    WeightedTerm("h_labelled", "label_weight", "classifiers", +1.0),
    WeightedTerm("batch_usage", "usage_weight", "all", -1.0),
    WeightedTerm("h_pseudo", "pseudo_weight", "classifiers", +1.0),
    WeightedTerm("h_z2_code", "code_weight", "code", +1.0),
    WeightedTerm("h_labelled_elbo", "labelled_elbo_weight", "all", +1.0),
)


def training_losses(values, weights, terms=WEIGHTED_TERMS):
    """{group: loss} of one step, from the step's scalars `values` ("objective": the batch mean
    of `elbo`'s objective, and each of the `terms` the step is compiled with) and `weights`
    ({weight name: scalar}): the group "all" holds -objective; each term adds
    sign * weight * value to its group. The step's loss is the sum over the groups; each
    group's gradient reaches only its variables."""
    losses = {"all": -values["objective"]}
    for term in terms:
        weighted = term.sign * weights[term.weight] * values[term.name]
        losses[term.group] = losses.get(term.group, 0.0) + weighted
    return losses


def _over_y(q_y_logits):
    """q(y|z1,x) and its log as [K,S,B], the layout of the enumerated terms."""
    log_q_y = tf.transpose(tf.nn.log_softmax(q_y_logits), [2, 0, 1])
    return tf.exp(log_q_y), log_q_y


def elbo(terms, temperature=1.0):
    """The ELBO per example with the sum over y done exactly, and its parts, each [B].

    F = E_q(z1|x)[ sum_y q(y|z1,x) E_q(z2|x,y,z1)[ log p(x,y,z1,z2) / q(y,z1,z2|x) ] ]
      = log_px - kl_z1 - kl_z2 - kl_y, with
    log_px = E[sum_y q(y) log p(x|y,z1)],  kl_z1 = E[log q(z1|x) - sum_y q(y) log p(z1|y,z2^y)],
    kl_z2 = E[sum_y q(y) KL[q(z2|x,y,z1)||p(z2)]],  kl_y = E[sum_y q(y) (log q(y|z1,x) - log p(y|z2^y))].
    `objective` is log_px - temperature * (kl_z1 + kl_z2 + kl_y): the KL warm-up.
    """
    q_y, log_q_y = _over_y(terms["q_y_logits"])

    def expect(t):  # sum over y weighted by q(y|z1,x), mean over the S samples -> [B]
        return tf.reduce_mean(tf.reduce_sum(q_y * t, axis=0), axis=0)

    log_px = expect(terms["log_p_x"])
    kl_z1 = tf.reduce_mean(terms["log_q_z1"], axis=0) - expect(terms["log_p_z1"])
    kl_z2 = expect(terms["kl_z2"])
    kl_y = expect(log_q_y - terms["log_p_y"])
    kl = kl_z1 + kl_z2 + kl_y
    return {"elbo": log_px - kl, "objective": log_px - temperature * kl,
            "log_px": log_px, "kl_z1": kl_z1, "kl_z2": kl_z2, "kl_y": kl_y}


def iw_log_weights(terms):
    """log w_s [S,B] with y summed exactly inside each importance weight.

    w_s = sum_y p(x,y,z1_s,z2_s^y) / (q(z1_s|x) q(z2_s^y|x,y,z1_s)), so E[w_s] = p(x) and
    log mean_s w_s is the importance-weighted bound log p_S(x).
    """
    log_joint_over_q_z2 = (terms["log_p_x"] + terms["log_p_z1"] + terms["log_p_y"]
                           + terms["log_p_z2"] - terms["log_q_z2"])
    return tf.reduce_logsumexp(log_joint_over_q_z2, axis=0) - terms["log_q_z1"]


def iw_log_weights_per_y(terms):
    """log w_s^y [K,S,B] = log p(x,y,z1_s,z2_s^y) / (q(z1_s|x) q(z2_s^y|x,y,z1_s)): the terms
    of `iw_log_weights` before their sum over y. E[w_s^y] = p(x,y), so normalising
    sum_s w_s^y over y estimates the model's own p(y|x)."""
    return (terms["log_p_x"] + terms["log_p_z1"] + terms["log_p_y"] + terms["log_p_z2"]
            - terms["log_q_z2"] - terms["log_q_z1"])


def sampled_log_weights(terms):
    """log w_s [S,B] with y drawn instead of summed: y_s ~ q(y|z1_s,x),
    w_s = p(x,y_s,z1_s,z2_s) / (q(z1_s|x) q(y_s|z1_s,x) q(z2_s|x,y_s,z1_s)).

    Also E[w_s] = p(x), at one evaluation of the y-dependent networks per sample instead of K.
    `terms` are those of `CaGeM.sampled_terms`, each [S,B].
    """
    log_p = terms["log_p_x"] + terms["log_p_z1"] + terms["log_p_y"] + terms["log_p_z2"]
    return log_p - terms["log_q_z1"] - terms["log_q_y"] - terms["log_q_z2"]


def bits_per_dim(log_likelihood, num_dims: int):
    """-log p / (D ln 2): nats per image as bits per dimension (pixel value)."""
    return -log_likelihood / (num_dims * math.log(2.0))


def log_mean_exp(log_w, axis=0):
    """log mean exp along `axis`, computed stably."""
    n = tf.cast(tf.shape(log_w)[axis], log_w.dtype)
    return tf.reduce_logsumexp(log_w, axis=axis) - tf.math.log(n)


def alpha(beta: float, num_unlabelled: int, num_labelled: int) -> float:
    """Weight of the labelled cross-entropies: alpha = beta * (N_u + N_l) / N_l (0 when N_l = 0)."""
    if num_labelled <= 0:
        return 0.0
    return beta * (num_unlabelled + num_labelled) / num_labelled


def batch_usage(q_y_logits):
    """H(mean_{s,b} q(y|z1_s,x_b)) in nats: the entropy of the batch's mean cluster
    distribution, log K when the batch spreads evenly over K clusters, 0 when one cluster takes
    it all. q_y_logits [S,B,K] -> scalar."""
    mean = tf.reduce_mean(tf.nn.softmax(q_y_logits), axis=[0, 1])
    return -tf.reduce_sum(mean * tf.math.log(mean + 1e-12))


def z2_code(terms):
    """E_q(y|z1,x)[-log p(y|z2^y)], mean over samples and examples: how poorly p(y|z2) tells
    which y each z2^y ~ q(z2|x,y,z1) was drawn for (the cross-entropy part of kl_y). The
    weights q(y|z1,x) are held fixed (no gradient): the term moves z2 and p(y|z2), not the
    clusters. Scalar."""
    q_y, _ = _over_y(terms["q_y_logits"])
    return tf.reduce_mean(tf.reduce_sum(tf.stop_gradient(q_y) * -terms["log_p_y"], axis=0))


def labelled_elbo(terms, labels, temperature=1.0):
    """The ELBO of each labelled example with y fixed to its label l (Kingma et al. 2014's
    labelled term, for CaGeM), under the KL warm-up; [B]:

    F(x,l) = E_q(z1|x) E_q(z2|x,l,z1)[ log p(x|l,z1) + log p(z1|l,z2) + log p(l|z2) + log p(z2)
             - log q(z1|x) - log q(z2|x,l,z1) ]
           = log p(x|l,z1) - T (log q(z1|x) - log p(z1|l,z2^l) - log p(l|z2^l)
                                + KL[q(z2|x,l,z1)||p(z2)]),
    the KL of z2 analytic, averaged over the S samples. q(y|z1,x) does not enter it.
    `terms` are `CaGeM.latent_terms` of the labelled batch, `labels` int [B]."""
    one_hot = tf.transpose(tf.one_hot(tf.cast(labels, tf.int32),
                                      tf.shape(terms["log_p_x"])[0]))[:, None, :]  # [K,1,B]

    def at_label(t):  # [K,S,B] -> [S,B], the branch y = label of each example
        return tf.reduce_sum(one_hot * t, axis=0)

    kl = (terms["log_q_z1"] - at_label(terms["log_p_z1"]) - at_label(terms["log_p_y"])
          + at_label(terms["kl_z2"]))
    return tf.reduce_mean(at_label(terms["log_p_x"]) - temperature * kl, axis=0)


def labelled_terms(log_p, log_q, labels):
    """The labelled batch's cross-entropies H_p, H_q of p(y|x) and q(y|x) (log-probabilities
    [B,K]), their sum h_labelled (the term alpha weighs) and the batch errors error_p,
    error_q of their argmax; labels int [B]. Scalars."""
    labels = tf.cast(labels, tf.int32)
    error = lambda lp: tf.reduce_mean(tf.cast(tf.argmax(lp, -1, tf.int32) != labels, tf.float32))
    h_p, h_q = cross_entropy(log_p, labels), cross_entropy(log_q, labels)
    return {"h_p": h_p, "h_q": h_q, "h_labelled": h_p + h_q, "error_p": error(log_p),
            "error_q": error(log_q)}


def cross_entropy(log_probs, labels):
    """Mean over the batch of -log prob[label]; log_probs [B,K], labels int [B]."""
    labels = tf.cast(labels, tf.int32)
    return -tf.reduce_mean(tf.gather(log_probs, labels, axis=1, batch_dims=1))

