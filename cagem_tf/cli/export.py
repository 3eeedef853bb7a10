"""cagem-export (export/main.py): export a trained run as a SavedModel, --model_dir RUN
[--checkpoint CKPT] [--export_dir DIR]."""

import sys

from absl import flags

from cagem_tf import cli

flags.DEFINE_string("model_dir", None, "Run directory written by the training program.")
flags.DEFINE_string("checkpoint", None, "Checkpoint prefix (e.g. RUN/checkpoints/ckpt-40); "
                    "default: the latest.")
flags.DEFINE_string("export_dir", None, "Where versions go (DIR/<n>/); default RUN/export.")
flags.mark_flag_as_required("model_dir")
FLAGS = flags.FLAGS


def main(argv):
    cli.start(argv)
    from cagem_tf import rundir, serving
    try:
        model = rundir.load_model(FLAGS.model_dir, FLAGS.checkpoint)
        path = serving.export(model, FLAGS.export_dir or rundir.RunDir(FLAGS.model_dir).export)
    except cli.user_errors() as e:
        sys.exit(f"error: {e}")
    print(f"exported {path}")


def run():
    cli.run(main, __name__)


if __name__ == "__main__":
    run()
