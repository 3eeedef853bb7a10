"""Evaluation measures: active units, KL per unit, and the metrics of a periodic evaluation."""

import os
import time

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from cagem_tf import clustering, files, objective
from cagem_tf.model import IW_CHUNK

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


def periodic_metrics(model, x, y, iw_samples: int, seed: int = 0, batch_size: int = 100,
                     iw_chunk: int = 50):
    """The metrics of one evaluation during training, on fixed images x [N,...], labels y [N].
    A chunk of the IW bound holds K x iw_chunk x batch_size images' p(x|y,z1) (160 MB at K = 10
    and 784 pixels; at 250 x 100 the quick start's evaluation took 7 GB).

    Returns floats (mean ELBO parts, iw_bound, active units) and arrays (kl_z1_per_unit,
    kl_z2_per_unit, z1_means, z2_means); the classifiers' errors are `cluster_report`'s.
    """
    sums = {}
    for index, start in enumerate(range(0, len(x), batch_size)):
        xb = x[start:start + batch_size]
        s = tf.constant([seed, index], tf.int32)
        parts = model.elbo(xb, seed=s)
        values = {k: parts[k] for k in ("elbo", "log_px", "kl_z1", "kl_z2", "kl_y")}
        if iw_samples > 0:
            values["iw_bound"] = model.iw_bound(xb, iw_samples, iw_chunk, seed=s + 1)
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + float(tf.reduce_sum(v))
    metrics = {k: v / len(x) for k, v in sums.items()}
    if model.reports_bits:
        metrics["bits_per_dim"] = float(objective.bits_per_dim(metrics["elbo"], model.data_dim))
        if "iw_bound" in metrics:
            metrics["iw_bits_per_dim"] = float(objective.bits_per_dim(metrics["iw_bound"],
                                                                      model.data_dim))
    latent = latent_summary(model, x, seed)
    metrics.update({k: latent[k] for k in ("active_units_z1", "active_units_z2")})
    metrics["kl_z1_per_unit"] = np.array(latent["kl_z1_per_unit"])
    metrics["kl_z2_per_unit"] = np.array(latent["kl_z2_per_unit"])
    metrics["z1_means"], metrics["z2_means"] = latent["z1_means"], latent["z2_means"]
    return metrics


def _save_atomic(path: str, array) -> None:
    files.write_file(path, lambda f: np.save(f, array), mode="wb")


def iw_bounds_file(directory: str, estimator: str, num_samples: int, seed: int, n: int,
                   batch_size: int, chunk_size: int | None) -> str:
    """The file of `iw_bounds`' per-image values in `directory`, named by every setting that
    changes them: the batches and chunks decide which random draws each image gets."""
    chunk = min(chunk_size or IW_CHUNK[estimator], num_samples)
    return os.path.join(directory, f"iw_{estimator}_{num_samples}_seed{seed}_n{n}"
                                   f"_batch{batch_size}_chunk{chunk}.npy")


def _load_partial(path: str, n: int):
    """The saved per-image values, or None when there are none or the file is damaged (they
    are recomputed: nothing else depends on them)."""
    if not os.path.isfile(path):
        return None
    try:
        values = np.load(path)
    except (ValueError, OSError, EOFError):
        return None
    return values if values.shape == (n,) else None


def iw_bounds(model, x, num_samples: int, directory: str, seed: int = 0, batch_size: int = 100,
              chunk_size: int | None = None, progress: bool = True,
              estimator: str = "exact"):
    """The IW bound log p_S(x) [N] of every image, saved to directory as it goes.

    Batch b uses the seed (seed, S, b), so an evaluation that is interrupted and rerun gives
    exactly the values of an uninterrupted one; finished batches are read back, not recomputed.
    The file, named by the settings (`iw_bounds_file`), holds NaN for images not done yet; a
    damaged one is started over. `estimator` is that of `CaGeM.iw_bound`.
    """
    os.makedirs(directory, exist_ok=True)
    path = iw_bounds_file(directory, estimator, num_samples, seed, len(x), batch_size,
                          chunk_size)
    values = _load_partial(path, len(x))
    if values is None:
        values = np.full([len(x)], np.nan, np.float32)
    bound = tf.function(lambda xb, s: model.iw_bound(xb, num_samples, chunk_size, seed=s,
                                                     estimator=estimator),
                        reduce_retracing=True)
    starts = range(0, len(x), batch_size)
    bar = keras.utils.Progbar(len(x), unit_name="image") if progress else None
    for index, start in enumerate(starts):
        end = min(start + batch_size, len(x))
        if np.isnan(values[start:end]).any():
            s = tf.constant([seed, num_samples * 100003 + index], tf.int32)
            values[start:end] = bound(x[start:end], s).numpy()
            _save_atomic(path, values)
        if bar:
            bar.update(end, [(f"F_{num_samples}", float(np.mean(values[:end])))])
    return values


def compare_estimators(model, x, rows, repeats: int = 3, batch_size: int = 10):
    """The IW bound of each (estimator, S) in `rows`, `repeats` times with independent seeds.

    Returns [(estimator, S, values [repeats, N], seconds per image)], with the default chunks
    of `CaGeM.iw_bound`. S is a tensor, so each row is traced once, on a single chunk, outside
    the timing.
    """
    results = []
    for estimator, num_samples in rows:
        bound = tf.function(lambda xb, seed, s, e=estimator: model.iw_bound(
            xb, s, None, seed, estimator=e))
        bound(x[:batch_size], tf.constant([0, 0]), tf.constant(1)).numpy()
        values, start = [], time.perf_counter()
        for r in range(repeats):
            values.append(np.concatenate([
                bound(x[i:i + batch_size], tf.constant([r, i]), tf.constant(num_samples)).numpy()
                for i in range(0, len(x), batch_size)]))
        seconds = (time.perf_counter() - start) / (repeats * len(x))
        results.append((estimator, num_samples, np.stack(values), seconds))
    return results


def estimators_markdown(results) -> str:
    """A table of `compare_estimators`: mean bound, the spread between seeds (standard
    deviation over seeds of log p_S(x), averaged over images), the difference to the first row
    paired by image with its standard error, and seconds per image."""
    lines = ["| estimator | S | mean log p_S(x) | spread between seeds | paired difference to "
             "row 1 | s per image |", "|---|---|---|---|---|---|"]
    reference = results[0][2].mean(0)
    for estimator, num_samples, values, seconds in results:
        diff = values.mean(0) - reference
        spread = values.std(0, ddof=1).mean() if len(values) > 1 else float("nan")
        lines.append(f"| {estimator} | {num_samples} | {values.mean():.3f} | {spread:.3f} | "
                     f"{diff.mean():+.3f} ± {diff.std() / np.sqrt(len(diff)):.3f} | "
                     f"{seconds:.3f} |")
    return "\n".join(lines)


def cluster_probs(model, x, seed: int = 0, batch_size: int = 500):
    """(p(y|x), q(y|x)) [N,K] of the Monte Carlo classifiers, in batches with fixed seeds."""
    parts = [model.classify(x[start:start + batch_size], seed=tf.constant([seed, index]))
             for index, start in enumerate(range(0, len(x), batch_size))]
    return (np.concatenate([p.numpy() for p, _ in parts]),
            np.concatenate([q.numpy() for _, q in parts]))


POSTERIOR_SAMPLES = 100  # importance samples of the model's own p(y|x) in evaluations


def posterior_probs(model, x, num_samples: int = POSTERIOR_SAMPLES, seed: int = 0,
                    batch_size: int = 50, chunk_size: int = 20):
    """The generative model's own p(y|x) [N,K] (`CaGeM.posterior_log_probs`), by batches of
    images and chunks of samples: a chunk holds K x chunk x batch images' p(x|y,z1) (40 MB at
    K = 10 and 784 pixels)."""
    fn = tf.function(lambda xb, s: model.posterior_log_probs(xb, num_samples, chunk_size,
                                                             seed=s))
    return np.concatenate([
        np.exp(fn(x[start:start + batch_size], tf.constant([seed, 2000 + i])).numpy())
        for i, start in enumerate(range(0, len(x), batch_size))])


# The classifiers' measures of `cluster_report` (a run with labels: y is the class).
CLASSIFIER_KEYS = ("error_p", "error_q", "h_p", "h_q", "error_posterior", "h_posterior",
                   "agreement_pq", "cross_entropy_p_y")


def cluster_report(model, x, y=None, num_classes: int | None = None, seed: int = 0,
                   batch_size: int = 500, classifiers: bool = True) -> dict:
    """How the model uses y on images x (`clustering.usage` of q(y|x)); with labels y, the
    clusters against them (`clustering.against_labels`); "q_y" holds q(y|x) [N,K] itself.
    With `classifiers` (a run trained with labels, whose K clusters are the classes) also
    `CLASSIFIER_KEYS`: h_p and h_q, the cross-entropies of p(y|x) and q(y|x) against the
    labels, their errors error_p and error_q (p(y|x) is the paper's cascade),
    error_posterior and h_posterior of the model's own p(y|x) by importance sampling
    (`posterior_probs`), agreement_pq, the share of images where argmax p(y|x) =
    argmax q(y|x), and cross_entropy_p_y = E_q[-log p(y|z2^y)] (one sample)."""
    p_y, q_y = cluster_probs(model, x, seed, batch_size)
    report = {**clustering.usage(q_y), "q_y": q_y}
    if y is not None:
        num_classes = num_classes or int(np.max(y)) + 1
        report.update(clustering.against_labels(q_y, y, num_classes))
    if not (classifiers and y is not None and q_y.shape[-1] == num_classes):
        return report
    report["agreement_pq"] = float(np.mean(np.argmax(p_y, -1) == np.argmax(q_y, -1)))
    report["error_p"] = float(np.mean(np.argmax(p_y, -1) != y))
    report["error_q"] = float(np.mean(np.argmax(q_y, -1) != y))
    index = (np.arange(len(y)), np.asarray(y, np.int64))
    report["h_p"] = float(-np.mean(np.log(np.maximum(p_y[index], 1e-30))))
    report["h_q"] = float(-np.mean(np.log(np.maximum(q_y[index], 1e-30))))
    posterior = posterior_probs(model, x, seed=seed)
    report["error_posterior"] = float(np.mean(np.argmax(posterior, -1) != y))
    report["h_posterior"] = float(-np.mean(np.log(np.maximum(posterior[index], 1e-30))))
    total = 0.0
    for index, start in enumerate(range(0, len(x), batch_size)):
        terms = model.latent_terms(x[start:start + batch_size], 1,
                                   seed=tf.constant([seed, 1000 + index]))
        q = tf.transpose(tf.nn.softmax(terms["q_y_logits"]), [2, 0, 1])      # [K,1,B]
        total += float(tf.reduce_sum(q * -terms["log_p_y"]))
    report["cross_entropy_p_y"] = total / len(x)
    return report


def means(model, x, batch_size: int = 500):
    """Posterior means (z1 [N,d1], z2 [N,d2]) of `CaGeM.encode`."""
    parts = [model.encode(x[start:start + batch_size]) for start in range(0, len(x), batch_size)]
    return (np.concatenate([p[0].numpy() for p in parts]),
            np.concatenate([p[1].numpy() for p in parts]))


def latent_summary(model, x, seed: int = 0, batch_size: int = 500):
    """Active units and KL per unit of z1 and z2, KL[q(z2|x,y) || p(z2)] as the paper quotes it
    (summed over units, weighted by q(y|z1,x)), and the means themselves."""
    z1_means, z2_means = means(model, x, batch_size)
    kl1, kl2, weights = [], [], []
    for index, start in enumerate(range(0, len(x), batch_size)):
        xb = x[start:start + batch_size]
        a, b = kl_per_unit(model, xb, tf.constant([seed, index], tf.int32))
        kl1.append(a)
        kl2.append(b)
        weights.append(len(xb))
    kl1 = np.average(kl1, axis=0, weights=weights)
    kl2 = np.average(kl2, axis=0, weights=weights)
    return {"z1_means": z1_means, "z2_means": z2_means,
            "active_units_z1": active_units(z1_means)[0],
            "active_units_z2": active_units(z2_means)[0],
            "kl_z1_per_unit": kl1.tolist(), "kl_z2_per_unit": kl2.tolist(),
            "kl_z1": float(kl1.sum()), "kl_q_z2_p_z2": float(kl2.sum())}
