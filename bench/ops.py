"""Where the time of the train step or of a SavedModel signature goes, by TensorFlow op type.

python bench/ops.py [--lower 1024 --upper 512 --clusters 10 --batch 100 --labels 0] [--steps 15]
    [--precision mixed_bfloat16]
python bench/ops.py --saved_model RUN/export/1 --signature classify --rows 256 [--calls 5]

The measurement is `cagem_tf.benchmark.ops`; docs/performance.md holds the numbers.
"""

import sys
import tempfile

from absl import app, flags

from cagem_tf import cpu
from cagem_tf.files import UserError
from cagem_tf.benchmark import ops, serving, throughput

flags.DEFINE_integer("lower", 1024, "Hidden width of the networks touching x (train step).")
flags.DEFINE_integer("upper", 512, "Hidden width of the other networks (train step).")
flags.DEFINE_integer("clusters", 10, "K (train step).")
flags.DEFINE_integer("batch", 100, "Unlabelled batch size (train step).")
flags.DEFINE_integer("labels", 0, "Labelled images per step, 0 for the unlabelled step.")
flags.DEFINE_integer("steps", 15, "Train steps traced.")
flags.DEFINE_enum("precision", "float32", ["float32", "mixed_bfloat16"], "Train step precision.")
flags.DEFINE_integer("intra_op_threads", 0, "0: TensorFlow's choice.")
flags.DEFINE_integer("inter_op_threads", 0, "0: TensorFlow's choice.")
flags.DEFINE_string("saved_model", None, "An export version directory: profile its "
                    "--signature instead of the train step.")
flags.DEFINE_string("signature", "classify", "Signature of --saved_model.")
flags.DEFINE_integer("rows", 256, "Batch size N of the signature's calls.")
flags.DEFINE_integer("calls", 5, "Signature calls traced.")
flags.DEFINE_integer("top", 12, "Op types listed; the rest are summed.")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {' '.join(argv[1:])}")
    logdir = tempfile.mkdtemp(prefix="cagem_ops_")
    if FLAGS.saved_model:
        try:
            serving.check([FLAGS.saved_model])
        except UserError as e:
            sys.exit(f"error: {e}")
        result = ops.saved_model(FLAGS.saved_model, FLAGS.signature, FLAGS.rows, FLAGS.calls,
                                 logdir)
        what, calls = f"{FLAGS.saved_model} `{FLAGS.signature}`, N = {FLAGS.rows}", FLAGS.calls
    else:
        spec = {**throughput.TRAIN, "lower": FLAGS.lower, "upper": FLAGS.upper,
                "clusters": FLAGS.clusters, "batch": FLAGS.batch, "labels": FLAGS.labels,
                "intra": FLAGS.intra_op_threads, "inter": FLAGS.inter_op_threads,
                "precision": FLAGS.precision}
        result = ops.train_step(spec, FLAGS.steps, logdir)
        what = (f"train step, hidden {FLAGS.lower}/{FLAGS.upper}, K = {FLAGS.clusters}, batch "
                f"{FLAGS.batch}, {FLAGS.labels} labelled, {FLAGS.precision}")
        calls = FLAGS.steps
    print(f"machine: {cpu.describe()}")
    print(f"{what}; per call, {calls} calls traced\n")
    print(ops.table(result, calls, FLAGS.top))


if __name__ == "__main__":
    app.run(main)
