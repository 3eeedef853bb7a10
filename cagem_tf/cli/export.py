"""cagem-export (export/main.py): export a trained run as a SavedModel, --model_dir RUN
[--checkpoint CKPT] [--export_dir DIR]."""

import sys

from absl import flags

from cagem_tf import cli
from cagem_tf.files import UserError

flags.DEFINE_string("model_dir", None, "Run directory written by the training program.")
flags.DEFINE_string("checkpoint", None, "Checkpoint prefix (e.g. RUN/checkpoints/ckpt-40); "
                    "default: the latest.")
flags.DEFINE_string("export_dir", None, "Where versions go (DIR/<n>/); default RUN/export.")
flags.DEFINE_list("export_iw_samples", ["1000"], "Importance samples S of the "
                  "log_likelihood_<S> signatures (one or more, e.g. 1000,5000).")
flags.mark_flag_as_required("model_dir")
FLAGS = flags.FLAGS


def main(argv):
    cli.start(argv)
    from cagem_tf import files, rundir, serving
    try:
        samples = [int(s) for s in FLAGS.export_iw_samples]
    except ValueError:
        sys.exit(f"error: --export_iw_samples {','.join(FLAGS.export_iw_samples)}: give "
                 "positive integers, e.g. 1000,5000")
    try:
        model = rundir.load_model(FLAGS.model_dir, FLAGS.checkpoint)
        if FLAGS.export_dir:
            path = serving.export(model, FLAGS.export_dir, iw_samples=samples)
        else:
            with files.Lock(FLAGS.model_dir, "export"):
                path = serving.export(model, rundir.RunDir(FLAGS.model_dir).export,
                                      iw_samples=samples)
    except UserError as e:
        sys.exit(f"error: {e}")
    print(f"exported {path}")


def run():
    cli.run(main, __name__)


if __name__ == "__main__":
    run()
