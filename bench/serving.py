"""Serving speed of exported SavedModels: rows/s and latency by batch size N, per signature.

python bench/serving.py --saved_model RUN/export/1,OTHER/1 --signatures classify,log_likelihood_1000
The exports alternate between rounds (a fresh TensorFlow-only process each); each cell is the
median of the rounds' medians.
"""

import statistics
import sys

from absl import app, flags

from cagem_tf import cpu
from cagem_tf.files import UserError
from cagem_tf.benchmark import serving

flags.DEFINE_list("saved_model", None, "SavedModel version directories to compare.")
flags.DEFINE_list("signatures", ["classify"], "Signatures to measure (inputs x, seed, y).")
flags.DEFINE_list("sizes", ["1", "16", "64", "256"], "Batch sizes N.")
flags.DEFINE_integer("rounds", 3, "Rounds; each measures every export once, in turn.")
flags.DEFINE_integer("calls", 7, "Timed calls per N in a round (their median).")
flags.mark_flag_as_required("saved_model")
FLAGS = flags.FLAGS


def main(argv):
    sizes = [int(n) for n in FLAGS.sizes]
    try:
        serving.check(FLAGS.saved_model)
    except UserError as e:
        sys.exit(f"error: {e}")
    rounds = {}
    for _ in range(FLAGS.rounds):
        for path in FLAGS.saved_model:
            for signature in FLAGS.signatures:
                rounds.setdefault((path, signature), []).append(
                    serving.measure(path, signature, sizes, FLAGS.calls))
    rows = [(path, signature, {n: {k: statistics.median(r[n][k] for r in measured)
                                   for k in ("rows_per_second", "latency_ms")}
                               for n in sizes})
            for (path, signature), measured in rounds.items()]
    print(f"machine: {cpu.describe()}")
    print(serving.table(rows))


if __name__ == "__main__":
    app.run(main)
