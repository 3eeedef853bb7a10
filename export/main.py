"""Export a trained run as a SavedModel:
python export/main.py --model_dir RUN [--checkpoint CKPT] [--export_dir DIR]."""

import os
import sys

# Run as a script from a checkout: make the repository root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from cagem_tf import cli, training  # noqa: E402
from export import saved_model  # noqa: E402

flags.DEFINE_string("model_dir", None, "Run directory written by train/main.py.")
flags.DEFINE_string("checkpoint", None, "Checkpoint prefix (e.g. RUN/checkpoints/ckpt-40); "
                    "default: the latest.")
flags.DEFINE_string("export_dir", None, "Where versions go (DIR/<n>/); default RUN/export.")
flags.mark_flag_as_required("model_dir")
FLAGS = flags.FLAGS


def main(argv):
    cli.start(argv)
    try:
        model = training.load_trained(FLAGS.model_dir, FLAGS.checkpoint)
        path = saved_model.export(model, FLAGS.export_dir or os.path.join(FLAGS.model_dir,
                                                                          "export"))
    except (training.rundir.RunError, saved_model.ExportError) as e:
        sys.exit(f"error: {e}")
    print(f"exported {path}")


if __name__ == "__main__":
    app.run(main)
