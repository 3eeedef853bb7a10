"""cagem-evaluate (train/evaluate.py): evaluate a trained run, --model_dir RUN
[--eval_iw_samples 1,10,5000] [--eval_subset N].

Writes RUN/evaluation/results.json and results.md (IW bounds with standard errors, classifier
errors, cluster use, active units, KL per unit), figures as PNG files in RUN/evaluation/, and
the same images to TensorBoard (RUN/logs/evaluation). IW bounds are saved per batch: a rerun
continues where an interrupted one stopped and gives the same numbers.
"""

import sys

from absl import flags

from cagem_tf import cli
from cagem_tf.files import UserError

flags.DEFINE_string("model_dir", None, "Run directory written by the training program.")
flags.DEFINE_string("checkpoint", None, "Checkpoint prefix; default: the latest.")
flags.DEFINE_list("eval_iw_samples", ["1", "10", "5000"], "Importance samples S of the "
                  "bounds F_S (as the training program's --eval_iw_samples, several at once).")
flags.DEFINE_integer("eval_subset", 0, "Evaluate the first N test images only (0: all; as the "
                     "training program's --eval_subset).")
flags.DEFINE_list("iw_samples", None, "Deprecated name of --eval_iw_samples.")
flags.DEFINE_integer("subset", None, "Deprecated name of --eval_subset.")
flags.DEFINE_string("figures_dir", None, "Where the figure PNG files go; default "
                    "RUN/evaluation.")
flags.DEFINE_integer("batch_size", 100, "Images per IW batch (the unit of saved progress).")
flags.DEFINE_integer("chunk_size", None, "Importance samples per chunk (memory); default 100 "
                     "for the exact estimator, 500 for the sampled one.")
flags.DEFINE_enum("split", "test", ["test", "validation"], "test: the data set's test split; "
                  "validation: the run's --validation hold-out.")
flags.DEFINE_enum("iw_estimator", "exact", ["exact", "sampled"], "exact: y summed inside "
                  "every importance weight; sampled: y ~ q(y|z1,x) per sample (cheaper, "
                  "more variance).")
flags.DEFINE_bool("figures", True, "Write the figures.")
flags.DEFINE_integer("seed", 0, "Seed of the evaluation's sampling.")
cli.define_thread_flags()
flags.mark_flag_as_required("model_dir")
FLAGS = flags.FLAGS


def main(argv):
    cli.start(argv)
    cli.rename("iw_samples", "eval_iw_samples")
    cli.rename("subset", "eval_subset")
    try:
        samples = [int(s) for s in FLAGS.eval_iw_samples]
    except ValueError:
        sys.exit(f"error: --eval_iw_samples {','.join(FLAGS.eval_iw_samples)}: give integers, "
                 "e.g. 1,10,5000")
    from cagem_tf import report
    try:
        report.evaluate(FLAGS.model_dir, FLAGS.checkpoint, samples, FLAGS.eval_subset,
                        FLAGS.batch_size, FLAGS.chunk_size, FLAGS.split, FLAGS.figures,
                        FLAGS.seed, iw_estimator=FLAGS.iw_estimator,
                        figures_dir=FLAGS.figures_dir)
    except UserError as e:
        sys.exit(f"error: {e}")


def run():
    cli.run(main, __name__)


if __name__ == "__main__":
    run()
