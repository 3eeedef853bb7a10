"""The train step of this checkout against another checkout of the library, side by side.

git worktree add --detach ../base COMMIT
python bench/versus_code.py --baseline ../base [--rounds 6] [--size paper|small] [--labels 100]
Prints a Markdown table for docs/performance.md (`cagem_tf.benchmark.versus_code`).
"""

import sys

from absl import app, flags

from cagem_tf.benchmark import throughput, versus_code

flags.DEFINE_string("baseline", None, "Root of the other checkout (e.g. a git worktree).")
flags.DEFINE_integer("rounds", 6, "Rounds; each measures both checkouts once, in turn.")
flags.DEFINE_enum("size", "paper", ["paper", "small"], "paper: hidden 1024/512; small: 500/256.")
flags.DEFINE_integer("labels", throughput.TRAIN["labels"], "Labelled examples per step (0: the "
                     "unlabelled step).")
flags.DEFINE_integer("steps", 20, "Train steps per timed window.")
flags.DEFINE_integer("windows", 3, "Timed windows per process; the median is reported.")
flags.mark_flag_as_required("baseline")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {' '.join(argv[1:])}")
    throughput.SETTINGS.update(steps=FLAGS.steps, windows=FLAGS.windows)
    size = {"paper": throughput.PAPER, "small": throughput.SMALL}[FLAGS.size]
    try:
        versus_code.run(FLAGS.baseline, FLAGS.rounds, versus_code.program_row(size, FLAGS.labels),
                        out=lambda line: print(line, flush=True))
    except ValueError as e:
        sys.exit(f"error: --baseline {e}")
    except RuntimeError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
