"""A trained CaGeM as a SavedModel for serving: sampler, classifier and likelihood signatures.

The SavedModel loads with TensorFlow alone. Every input and output of every signature has a
leading batch dimension N, so that each signature works with TF Serving's REST row format
({"instances": [...]}), its columnar format ({"inputs": {...}}) and server-side batching: a
row's answer depends on that row alone, never on the other rows batched with it.

  classify(x)                 -> p_y [N,K] (the cascade p(y|x)), q_y [N,K] (q(y|x)),
                                 label [N] int32: argmax q(y|x)      (serving_default)
  classify_posterior(x)       -> p_y [N,K] (the generative model's own p(y|x) =
                                 p(x,y) / sum_y' p(x,y'), importance-sampled with S = 10),
                                 label [N] int32: its argmax
  sample(seed)                -> probs [N,H,W,C] (the means of p(x|y,z1) in [0, 1]: a
                                 Bernoulli's probabilities), images [N,H,W,C] (a sample of
                                 p(x|y,z1): binary, or 8-bit levels / 255), y [N] int32
  sample_class(y, seed)       -> probs, images
  log_likelihood_<S>(x)       -> log_likelihood [N] (nats, the importance-weighted bound with S
                                 samples, y summed in every weight)
  log_likelihood_sampled_<S>(x) -> log_likelihood [N] (the same bound with y drawn from
                                 q(y|z1,x) per sample: about K/1.4 times cheaper per sample)
  encode(x)                   -> z1 [N,d1], z2 [N,d2] (means; z2 with y marginalised)
  reconstruct(x)              -> probs [N,H,W,C] (means in [0, 1])
x is float32 [N,H,W,C] in [0,1] (C = 1 or 3, as trained; 8-bit data as level / 255); y and seed are int32 [N]: one sample per seed, the same seed
gives the same sample, a negative seed draws fresh randomness. S is fixed per signature (the
export's `iw_samples`). Inputs are checked in the graph: a bad one fails with a message naming
the expected shape or range. Versions follow TF Serving: DIR/<integer>/, written aside and
renamed into place. The SavedModel's `likelihood` attribute (a list of one string variable,
`tf.saved_model.load(path).likelihood[0]`) names p(x|y,z1):
"bernoulli" (x binarized, as in training) or "discretized_logistic" (x the 8-bit levels / 255).
"""

import os
import re
import shutil

import tensorflow as tf

from cagem_tf.files import UserError

CLASSIFIER_SEED = (0, 0)      # classify and log_likelihood answer the same for the same input
IW_SAMPLES = (1000,)          # the likelihood signatures of an export, by default
# Importance samples of classify_posterior: its error at 10 is that at the evaluations' 100
# within the test images' noise, at a tenth of the cost (docs/results.md).
POSTERIOR_SAMPLES = 10
POSTERIOR_ROWS = 16           # rows per block of classify_posterior
IW_ROWS = 8                   # rows per block of the likelihood signatures (memory: rows x chunk)


class ExportError(UserError, RuntimeError):
    """An export that cannot be written as asked."""


def _row_seeds(seed):
    """int32 [N] seeds -> [N,2] stateless seeds: seed >= 0 -> [seed, 0]; seed < 0 -> a fresh
    random pair."""
    fresh = tf.random.uniform(tf.concat([tf.shape(seed), [2]], 0), 0, 2**31 - 1, tf.int32)
    given = tf.stack([seed, tf.zeros_like(seed)], -1)
    return tf.where(seed[:, None] < 0, fresh, given)


def _in_blocks(fn, x, rows: int, tail=()):
    """fn on blocks of `rows` rows of x and then on the rows left over: the likelihood's memory
    grows with rows x samples per chunk, so a large batch is computed a block at a time.
    fn maps [n, ...] to [n, *tail] float32."""
    # One graph of fn for its three uses (a block, the rows left over, a small batch): the
    # likelihood's graph is the export's largest, and tracing it once makes exports faster.
    fn = tf.function(fn, input_signature=[tf.TensorSpec([None, *x.shape[1:]], x.dtype)])
    n = tf.shape(x)[0]

    def blocked():
        full = n // rows
        blocks = tf.reshape(x[:full * rows], tf.concat([[full, rows], tf.shape(x)[1:]], 0))
        values = tf.reshape(tf.map_fn(fn, blocks, fn_output_signature=tf.float32),
                            [-1, *tail])
        rest = x[full * rows:]
        # The rows left over go on their own (no padding rows computed for nothing).
        return tf.concat([values, tf.cond(tf.shape(rest)[0] > 0, lambda: fn(rest),
                                          lambda: tf.zeros([0, *tail], tf.float32))], 0)

    # A batch of one block (one row alone, above all) is computed as it is, without a loop.
    return tf.cond(n <= rows, lambda: fn(x), blocked)


def _endpoints(model, iw_samples=IW_SAMPLES):
    """(name, function, input signature) of every signature, classify first."""
    shape = list(model.image_shape)
    K = model.num_clusters
    described = f"x must be float32 [N,{','.join(map(str, shape))}] with values in [0, 1]"
    x_spec = tf.TensorSpec([None, *shape], tf.float32, name="x")
    seed_spec = tf.TensorSpec([None], tf.int32, name="seed")
    y_spec = tf.TensorSpec([None], tf.int32, name="y")
    fixed = tf.constant(CLASSIFIER_SEED, tf.int32)

    def images(x):
        checks = [tf.debugging.assert_greater_equal(x, 0.0, message=described),
                  tf.debugging.assert_less_equal(x, 1.0, message=described)]
        with tf.control_dependencies(checks):
            return tf.identity(x)

    def classify(x):
        # The whole batch at once, every row with the same draws: a row's answer is the one
        # it gets alone.
        p_y, q_y = model.classify(images(x), seed=fixed, row_independent=True)
        # The served label is q(y|x)'s: in every measured run it errs less than the cascade
        # (docs/results.md); the model's own posterior, classify_posterior, costs 6x as much.
        return {"p_y": p_y, "q_y": q_y, "label": tf.argmax(q_y, -1, output_type=tf.int32)}

    def classify_posterior(x):
        # Blocks of rows at once, every row with the same draws: a row's answer is the one it
        # gets alone.
        log_p = _in_blocks(lambda block: model.posterior_log_probs(
            block, POSTERIOR_SAMPLES, seed=fixed, row_independent=True), images(x),
            POSTERIOR_ROWS, tail=(K,))
        return {"p_y": tf.exp(log_p), "label": tf.argmax(log_p, -1, output_type=tf.int32)}

    def sample(seed):
        # The whole batch at once; each row's noise comes from its own seed alone.
        seeds = _row_seeds(seed)
        probs, drawn, y = model.sample(tf.shape(seed)[0], noise=model.row_noise(seeds),
                                       draw=True)
        return {"probs": probs, "images": drawn, "y": y}

    def sample_class(y, seed):
        check = tf.debugging.assert_equal(
            tf.logical_and(y >= 0, y < K), True,
            message=f"y must be int32 [N] with values in [0, {K})")
        size = tf.debugging.assert_equal(tf.size(y), tf.size(seed),
                                         message="y and seed must have the same length N")
        with tf.control_dependencies([check, size]):
            y = tf.identity(y)
        probs, drawn, _ = model.sample(tf.shape(y)[0], y=y,
                                       noise=model.row_noise(_row_seeds(seed)), draw=True)
        return {"probs": probs, "images": drawn}

    def likelihood(estimator, samples):
        def log_likelihood(x):
            # Blocks of rows at once, every row with the same draws and the same chunks of
            # samples: a row's bound is the one it gets alone.
            value = _in_blocks(lambda block: model.iw_bound(
                block, samples, seed=fixed, estimator=estimator, row_independent=True),
                images(x), IW_ROWS)
            return {"log_likelihood": value}
        return log_likelihood

    def encode(x):
        z1, z2 = model.encode(images(x))
        return {"z1": z1, "z2": z2}

    def reconstruct(x):
        return {"probs": model.reconstruct(images(x))}

    endpoints = [("classify", classify, [x_spec]),
                 ("classify_posterior", classify_posterior, [x_spec]),
                 ("sample", sample, [seed_spec]),
                 ("sample_class", sample_class, [y_spec, seed_spec])]
    for samples in iw_samples:
        endpoints += [(f"log_likelihood_{samples}", likelihood("exact", samples), [x_spec]),
                      (f"log_likelihood_sampled_{samples}", likelihood("sampled", samples),
                       [x_spec])]
    return endpoints + [("encode", encode, [x_spec]), ("reconstruct", reconstruct, [x_spec])]


def versions(export_dir: str) -> list[int]:
    """The export versions in export_dir (its integer-named folders), oldest first; [] when
    it does not exist."""
    if not os.path.isdir(export_dir):
        return []
    return sorted(int(name) for name in os.listdir(export_dir) if re.fullmatch(r"\d+", name))


def next_version(export_dir: str) -> int:
    """1 + the largest version in export_dir (1 when there is none)."""
    return max(versions(export_dir), default=0) + 1


def export(model, export_dir: str, keep: int = 0, iw_samples=IW_SAMPLES) -> str:
    """Writes the SavedModel of `model` to export_dir/<next version>/; returns that path.

    `iw_samples`: the S of the likelihood signatures. It is written to a hidden temporary
    directory beside it and renamed, so that a reader never
    sees a half-written version and an existing version is never overwritten. keep > 0 then
    removes all but the newest `keep` versions (TF Serving serves the newest by itself).
    """
    try:
        os.makedirs(export_dir, exist_ok=True)
    except OSError as e:
        raise ExportError(f"--export_dir {export_dir}: cannot create it ({os.strerror(e.errno)}); "
                          "give a folder you can write") from None
    version = next_version(export_dir)
    final = os.path.join(export_dir, str(version))
    tmp = os.path.join(export_dir, f".tmp-{version}-{os.getpid()}")
    if not iw_samples or min(iw_samples) < 1:
        raise ExportError(f"iw_samples {list(iw_samples)}: give one or more positive counts")
    # tf.saved_model.save on a module of tf.functions with input signatures traces each once,
    # in its save context; Keras' ExportArchive traced each before that too (the save context
    # is part of the tracing key), which made an export take about twice as long.
    root = tf.Module()
    # The TensorFlow variables under Keras' (what the functions capture): TF1 loaders such as
    # saved_model_cli restore only the variables tracked as themselves.
    root.model_variables = [v.value for v in model.variables]
    # What x is to the model, for its clients (cagem-classify binarizes for "bernoulli"): a
    # string variable, read with tf.saved_model.load(path).likelihood[0].numpy().
    root.likelihood = [tf.Variable(model.spec.likelihood, trainable=False, name="likelihood")]
    # The served networks with batch norm folded into their weights, computed once here: the
    # weights of an export do not change (docs/performance.md).
    with model.folded_batch_norm() as folded:
        root.folded_batch_norm = folded
        signatures = {}
        for name, fn, signature in _endpoints(model, tuple(int(s) for s in iw_samples)):
            signatures[name] = tf.function(fn, input_signature=signature, autograph=False)
            setattr(root, name, signatures[name])
        signatures["serving_default"] = signatures["classify"]
        try:
            tf.saved_model.save(root, tmp, signatures=signatures)
        except (OSError, tf.errors.OpError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            reason = os.strerror(e.errno) if getattr(e, "errno", None) else str(e).splitlines()[0]
            raise ExportError(f"could not write the export {final} ({reason}); the earlier "
                              "versions are intact: free space and export again") from None
    try:
        os.rename(tmp, final)
    except OSError as e:
        raise ExportError(f"{final} appeared while exporting ({e}); the export is left in "
                          f"{tmp}") from None
    if keep > 0:
        for old in versions(export_dir)[:-keep]:
            shutil.rmtree(os.path.join(export_dir, str(old)), ignore_errors=True)
    return final
