"""A trained CaGeM as a SavedModel for serving: sampler, classifier and likelihood signatures.

The SavedModel loads with TensorFlow alone. Signatures (inputs -> outputs):
  classify(x)                      -> p_y [N,K], q_y [N,K], label [N] int32   (serving_default)
  sample(num_samples, seed)        -> probs [N,H,W,C], images [N,H,W,C], y [N] int32
  sample_class(y, seed)            -> probs, images
  log_likelihood(x, num_samples)   -> log_likelihood [N] (nats, importance-weighted bound,
                                      y summed in every weight)
  log_likelihood_sampled(x, num_samples) -> log_likelihood [N] (the same bound with y drawn from
                                      q(y|z1,x) per sample: about K/1.4 times cheaper per sample)
  encode(x)                        -> z1 [N,d1], z2 [N,d2] (means; z2 with y marginalised)
  reconstruct(x)                   -> probs [N,H,W,C]
x is float32 [N,H,W,C] in [0,1]; seeds are int32 scalars (negative: fresh randomness).
Inputs are checked in the graph; a bad one fails with a message naming the expected shape or
range. Versions follow TF Serving: DIR/<integer>/, written aside and renamed into place.
"""

import os
import re
import shutil

import keras
import tensorflow as tf

CLASSIFIER_SEED = (0, 0)      # classify and log_likelihood answer the same for the same input


class ExportError(RuntimeError):
    """An export that cannot be written as asked."""


def _stateless_seed(seed):
    """seed >= 0 -> [seed, 0]; seed < 0 -> a fresh random pair."""
    fresh = tf.random.uniform([2], 0, 2**31 - 1, dtype=tf.int32)
    return tf.where(seed < 0, fresh, tf.stack([seed, tf.constant(0, tf.int32)]))


def _endpoints(model):
    """(name, function, input signature) of every signature, classify first."""
    shape = list(model.image_shape)
    K = model.num_clusters
    described = f"x must be float32 [N,{','.join(map(str, shape))}] with values in [0, 1]"
    x_spec = tf.TensorSpec(None, tf.float32, name="x")
    seed_spec = tf.TensorSpec([], tf.int32, name="seed")
    count_spec = tf.TensorSpec([], tf.int32, name="num_samples")

    def images(x):
        # The size is compared only once the rank is known to match.
        shape_ok = tf.cond(tf.equal(tf.rank(x), len(shape) + 1),
                           lambda: tf.reduce_all(tf.equal(tf.shape(x)[1:], shape)),
                           lambda: tf.constant(False))
        with tf.control_dependencies([tf.debugging.assert_equal(shape_ok, True,
                                                                message=described)]):
            checks = [tf.debugging.assert_greater_equal(x, 0.0, message=described),
                      tf.debugging.assert_less_equal(x, 1.0, message=described)]
        with tf.control_dependencies(checks):
            return tf.identity(x)

    def count(n, what):
        check = tf.debugging.assert_positive(n, message=f"{what} must be a positive int32")
        with tf.control_dependencies([check]):
            return tf.identity(n)

    def binary(probs, seed):
        noise_seed = tf.random.experimental.stateless_fold_in(seed, 1)
        return tf.cast(tf.random.stateless_uniform(tf.shape(probs), noise_seed) < probs,
                       tf.float32)

    def classify(x):
        p_y, q_y = model.classify(images(x), seed=tf.constant(CLASSIFIER_SEED))
        return {"p_y": p_y, "q_y": q_y, "label": tf.argmax(p_y, -1, output_type=tf.int32)}

    def sample(num_samples, seed):
        seed = _stateless_seed(seed)
        probs, y = model.sample(count(num_samples, "num_samples"), seed=seed)
        return {"probs": probs, "images": binary(probs, seed), "y": y}

    def sample_class(y, seed):
        check = tf.debugging.assert_equal(
            tf.logical_and(y >= 0, y < K), True,
            message=f"y must be int32 [N] with values in [0, {K})")
        with tf.control_dependencies([check]):
            y = tf.identity(y)
        seed = _stateless_seed(seed)
        probs, _ = model.sample(tf.size(y), y=y, seed=seed)
        return {"probs": probs, "images": binary(probs, seed)}

    def likelihood(estimator):
        def log_likelihood(x, num_samples):
            value = model.iw_bound(images(x), count(num_samples, "num_samples"),
                                   seed=tf.constant(CLASSIFIER_SEED), estimator=estimator)
            return {"log_likelihood": value}
        return log_likelihood

    def encode(x):
        z1, z2 = model.encode(images(x))
        return {"z1": z1, "z2": z2}

    def reconstruct(x):
        return {"probs": model.reconstruct(images(x))}

    return [("classify", classify, [x_spec]),
            ("sample", sample, [count_spec, seed_spec]),
            ("sample_class", sample_class, [tf.TensorSpec([None], tf.int32, name="y"),
                                            seed_spec]),
            ("log_likelihood", likelihood("exact"), [x_spec, count_spec]),
            ("log_likelihood_sampled", likelihood("sampled"), [x_spec, count_spec]),
            ("encode", encode, [x_spec]),
            ("reconstruct", reconstruct, [x_spec])]


def next_version(export_dir: str) -> int:
    """1 + the largest integer version in export_dir (1 when there is none)."""
    if not os.path.isdir(export_dir):
        return 1
    versions = [int(name) for name in os.listdir(export_dir) if re.fullmatch(r"\d+", name)]
    return max(versions, default=0) + 1


def export(model, export_dir: str, keep: int = 0) -> str:
    """Writes the SavedModel of `model` to export_dir/<next version>/; returns that path.

    It is written to a hidden temporary directory beside it and renamed, so that a reader never
    sees a half-written version and an existing version is never overwritten. keep > 0 then
    removes all but the newest `keep` versions (TF Serving serves the newest by itself).
    """
    os.makedirs(export_dir, exist_ok=True)
    version = next_version(export_dir)
    final = os.path.join(export_dir, str(version))
    tmp = os.path.join(export_dir, f".tmp-{version}-{os.getpid()}")
    archive = keras.export.ExportArchive()
    archive.track(model)
    for name, fn, signature in _endpoints(model):
        archive.add_endpoint(name, fn, input_signature=signature)
    archive.write_out(tmp, verbose=False)
    try:
        os.rename(tmp, final)
    except OSError as e:
        raise ExportError(f"{final} appeared while exporting ({e}); the export is left in "
                          f"{tmp}") from None
    if keep > 0:
        versions = sorted(int(n) for n in os.listdir(export_dir) if re.fullmatch(r"\d+", n))
        for old in versions[:-keep]:
            shutil.rmtree(os.path.join(export_dir, str(old)), ignore_errors=True)
    return final
