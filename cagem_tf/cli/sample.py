"""cagem-sample (export/sample.py): a PNG grid of samples from an exported SavedModel, read with
TensorFlow alone: --saved_model DIR --num_samples 100 [--label 3] [--seed 0] --out samples.png"""

import math
import re
import sys

from absl import flags

from cagem_tf import cli

flags.DEFINE_string("saved_model", None, "A SavedModel version directory (e.g. RUN/export/1).")
flags.DEFINE_integer("num_samples", 100, "Number of samples.")
flags.DEFINE_integer("num", None, "Deprecated name of --num_samples.")
flags.DEFINE_integer("label", None, "Sample this class/cluster only: z2 ~ p(z2), y set to the "
                     "label, z1 ~ p(z1|y,z2), x ~ p(x|y,z1) (z2 is not drawn from p(z2|y)); "
                     "default y ~ p(y|z2).")
flags.DEFINE_integer("seed", 0, "Seed: sample i uses seed * num_samples + i (the same samples "
                     "every time); negative for fresh randomness.")
flags.DEFINE_bool("binary", False, "Draw binary images instead of Bernoulli means.")
flags.DEFINE_string("out", "samples.png", "Output PNG file.")
flags.mark_flag_as_required("saved_model")
FLAGS = flags.FLAGS


def main(argv):
    cli.start(argv)
    cli.rename("num", "num_samples")
    import tensorflow as tf
    import os
    if FLAGS.num_samples < 1:
        sys.exit(f"error: --num_samples {FLAGS.num_samples}: must be at least 1")
    if FLAGS.seed >= 0 and (FLAGS.seed + 1) * FLAGS.num_samples > 2**31 - 1:
        sys.exit(f"error: --seed {FLAGS.seed}: seed * num_samples + i must fit in int32; give "
                 f"a seed below {(2**31 - 1) // FLAGS.num_samples}")
    folder = os.path.dirname(os.path.abspath(FLAGS.out))
    if not os.path.isdir(folder):
        sys.exit(f"error: --out {FLAGS.out}: no folder {folder}; create it first")
    try:
        model = tf.saved_model.load(FLAGS.saved_model)
    except OSError as e:
        sys.exit(f"error: --saved_model {FLAGS.saved_model}: {str(e).splitlines()[0]}")
    n = FLAGS.num_samples
    seed = tf.constant([FLAGS.seed * n + i if FLAGS.seed >= 0 else -1 for i in range(n)],
                       tf.int32)
    try:
        if FLAGS.label is None:
            out = model.signatures["sample"](seed=seed)
        else:
            out = model.signatures["sample_class"](y=tf.fill([n], FLAGS.label), seed=seed)
    except tf.errors.InvalidArgumentError as e:
        found = re.search(r"assertion failed: \[(.*?)\] \[Condition", e.message)
        sys.exit(f"error: {found.group(1) if found else e.message.splitlines()[0]}")
    from cagem_tf import figures
    images = (out["images"] if FLAGS.binary else out["probs"]).numpy()
    figures.save_png(figures.grid(images, math.ceil(math.sqrt(FLAGS.num_samples))), FLAGS.out)
    print(f"wrote {FLAGS.out}")


def run():
    cli.run(main, __name__)


if __name__ == "__main__":
    run()
