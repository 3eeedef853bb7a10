"""The two IW estimators of log p(x) on a trained run: value, spread and cost, at equal S and at
equal time. Prints a Markdown table.

python experiments/estimators.py --model_dir RUN [--images 100] [--repeats 3]
                                 [--samples exact:5000,sampled:5000,sampled:30000]

"exact" sums y inside every importance weight; "sampled" draws y ~ q(y|z1,x) once per sample
(CaGeM.iw_bound); both are lower bounds of log p(x) in expectation, so larger is better. Each
(estimator, S) is computed --repeats times with independent seeds on the same test images
(binarized once with the run's seed, as in train/evaluate.py); see
cagem_tf.evaluation.estimators_markdown for the columns.
"""

import sys
import time

from absl import flags

from cagem_tf import cli, data, evaluation, rundir

flags.DEFINE_string("model_dir", None, "Run directory written by train/main.py.")
flags.DEFINE_list("samples", ["exact:5000", "sampled:5000", "sampled:30000"],
                  "estimator:S pairs; the first row is the reference of the paired difference.")
flags.DEFINE_integer("images", 100, "First N test images.")
flags.DEFINE_integer("repeats", 3, "Independent evaluations per row.")
flags.DEFINE_integer("batch_size", 10, "Images per call of the bound.")
cli.define_thread_flags()
flags.mark_flag_as_required("model_dir")
FLAGS = flags.FLAGS


def parse(rows):
    """["exact:5000", ...] -> [("exact", 5000), ...]."""
    out = []
    for row in rows:
        estimator, _, s = row.partition(":")
        if estimator not in ("exact", "sampled") or not s.isdigit() or int(s) < 1:
            raise rundir.RunError(f"--samples {row!r}: use estimator:S with estimator exact or "
                                  "sampled and S >= 1, e.g. exact:5000")
        out.append((estimator, int(s)))
    return out


def run(model_dir, rows, images, repeats, batch_size):
    if images < 1 or repeats < 2 or batch_size < 1:
        raise rundir.RunError("--images and --batch_size must be >= 1 and --repeats >= 2 (the "
                              "spread needs two seeds)")
    model = rundir.load_model(model_dir)
    _, x, _, _ = rundir.evaluation_images(model_dir, images, log=lambda m: None)
    print(f"{model_dir}: {len(x)} test images, {repeats} seeds, {time.strftime('%Y-%m-%d')}\n")
    results = evaluation.compare_estimators(model, x, rows, repeats, batch_size)
    print(evaluation.estimators_markdown(results))


def main(argv):
    cli.start(argv, "; usage: python experiments/estimators.py --model_dir RUN")
    try:
        run(FLAGS.model_dir, parse(FLAGS.samples), FLAGS.images, FLAGS.repeats,
            FLAGS.batch_size)
    except (data.DataError, rundir.RunError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    cli.run(main, __name__)
