"""The library's train step against the same network in PyTorch, eager and torch.compile.

python bench/versus_torch.py --torch_python ~/benchenv/bin/python [--rounds 3]
PyTorch lives in the benchmark's own environment (`--torch_python`), never in the package's.
Prints a Markdown table for docs/performance.md.
"""

import os
import sys

from absl import app, flags

from cagem_tf.benchmark import peers

flags.DEFINE_string("torch_python", None, "A Python with PyTorch installed (its own venv).")
flags.DEFINE_integer("rounds", 3, "Rounds; each runs every variant once, in turn.")
flags.DEFINE_integer("steps", 15, "Train steps per timed window.")
flags.DEFINE_integer("windows", 5, "Timed windows per process; the median is reported.")
flags.mark_flag_as_required("torch_python")
FLAGS = flags.FLAGS


def main(argv):
    if not os.access(FLAGS.torch_python, os.X_OK):
        sys.exit(f"error: --torch_python {FLAGS.torch_python}: not an executable; give the "
                 "python of an environment with PyTorch (python -m venv ENV && ENV/bin/pip "
                 "install torch)")
    try:
        peers.run(FLAGS.torch_python, FLAGS.rounds, FLAGS.steps, FLAGS.windows,
                  out=lambda line: print(line, flush=True))
    except RuntimeError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
