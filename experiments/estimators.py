"""The two IW estimators of log p(x) on a trained run: value, spread and cost, at equal S and at
equal time. Prints a Markdown table.

python experiments/estimators.py --model_dir RUN [--images 100] [--repeats 3]
                                 [--samples exact:5000,sampled:5000,sampled:35000]

"exact" sums y inside every importance weight; "sampled" draws y ~ q(y|z1,x) once per sample
(CaGeM.iw_bound). For each (estimator, S) the bound log p_S(x) is computed `repeats` times with
independent seeds on the same test images (binarized once with the run's seed, as in
train/evaluate.py). Reported: the mean bound over images and repeats, the spread between
repeats (the standard deviation over seeds of log p_S(x), averaged over images: the Monte Carlo
noise of one evaluation), the difference to the first row paired by image, and seconds per image.
Larger is better for the bound; both are lower bounds of log p(x) in expectation.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from cagem_tf import cli, data, rundir, training  # noqa: E402

flags.DEFINE_string("model_dir", None, "Run directory written by train/main.py.")
flags.DEFINE_list("samples", ["exact:5000", "sampled:5000", "sampled:35000"],
                  "estimator:S pairs; the first row is the reference of the paired difference.")
flags.DEFINE_integer("images", 100, "First N test images.")
flags.DEFINE_integer("repeats", 3, "Independent evaluations per row (seeds 0..repeats-1).")
flags.DEFINE_integer("batch_size", 10, "Images per call of the bound.")
flags.DEFINE_integer("chunk_size", 100, "Samples per chunk of the bound (exact estimator); the "
                     "sampled estimator uses 5x as many at the same memory.")
flags.mark_flag_as_required("model_dir")
FLAGS = flags.FLAGS


def parse(rows):
    out = []
    for row in rows:
        estimator, _, s = row.partition(":")
        if estimator not in ("exact", "sampled") or not s.isdigit() or int(s) < 1:
            raise rundir.RunError(f"--samples {row!r}: use estimator:S with estimator exact or "
                                  "sampled and S >= 1, e.g. exact:5000")
        out.append((estimator, int(s)))
    return out


def compare(model, x, rows, repeats, batch_size, chunk_size):
    """Per row: bounds [repeats, N] and seconds per image."""
    import numpy as np
    import tensorflow as tf

    results = []
    for estimator, s in rows:
        chunk = chunk_size * (5 if estimator == "sampled" else 1)
        bound = tf.function(lambda xb, seed, s, e=estimator, c=chunk: model.iw_bound(
            xb, s, c, seed, estimator=e))
        bound(x[:batch_size], tf.constant([0, 0]), tf.constant(1)).numpy()  # tracing
        values, start = [], time.perf_counter()
        for r in range(repeats):
            values.append(np.concatenate([
                bound(x[i:i + batch_size], tf.constant([r, i]), tf.constant(s)).numpy()
                for i in range(0, len(x), batch_size)]))
        seconds = (time.perf_counter() - start) / (repeats * len(x))
        results.append((estimator, s, np.stack(values), seconds))
    return results


def markdown(results):
    import numpy as np

    lines = ["| estimator | S | mean log p_S(x) | spread between seeds | paired difference to "
             "row 1 | s per image |", "|---|---|---|---|---|---|"]
    ref = results[0][2].mean(0)
    for estimator, s, values, seconds in results:
        n = values.shape[1]
        diff = values.mean(0) - ref
        lines.append(f"| {estimator} | {s} | {values.mean():.3f} | "
                     f"{values.std(0, ddof=1).mean() if len(values) > 1 else float('nan'):.3f} | "
                     f"{diff.mean():+.3f} ± {diff.std() / np.sqrt(n):.3f} | {seconds:.3f} |")
    return "\n".join(lines)


def run(model_dir, rows, images, repeats, batch_size, chunk_size):
    if images < 1 or repeats < 1 or batch_size < 1 or chunk_size < 1:
        raise rundir.RunError("--images, --repeats, --batch_size and --chunk_size must be >= 1")
    model = training.load_trained(model_dir)
    config = rundir.read_json(os.path.join(model_dir, rundir.CONFIG))
    arrays = data.load(config["dataset"], config.get("data_dir"), config.get("manual_dir"),
                       log=lambda m: None)
    x = data.binarize_once(arrays.x_test[:images], config["seed"])
    print(f"{model_dir}: {len(x)} test images, {repeats} seeds, {time.strftime('%Y-%m-%d')}\n")
    print(markdown(compare(model, x, rows, repeats, batch_size, chunk_size)))


def main(argv):
    cli.start(argv, "; usage: python experiments/estimators.py --model_dir RUN")
    try:
        run(FLAGS.model_dir, parse(FLAGS.samples), FLAGS.images, FLAGS.repeats,
            FLAGS.batch_size, FLAGS.chunk_size)
    except (data.DataError, rundir.RunError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
