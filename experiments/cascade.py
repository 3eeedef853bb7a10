"""Why the cascade p(y|x) lags q(y|x) on a run trained with labels: probes of the latents'
class information and p(y|z2) refitted alone (cagem_tf.probes). Prints a Markdown table.

python experiments/cascade.py --model_dir RUN [--train_images 20000] [--test_images 1000]
                              [--draws 3] [--hidden 256] [--probe_steps 2000]
                              [--refit_steps 4000]
"""

import sys

from absl import flags

from cagem_tf import cli, data, probes, rundir

flags.DEFINE_string("model_dir", None, "Run directory written by train/main.py (with --labels).")
flags.DEFINE_integer("train_images", 20000, "First N training images to fit the probes to.")
flags.DEFINE_integer("test_images", 1000, "First N test images to score on.")
flags.DEFINE_integer("draws", 3, "Draws of z2 per training image for the probes on draws.")
flags.DEFINE_integer("hidden", 256, "Hidden units of the larger probe.")
flags.DEFINE_integer("probe_steps", 2000, "Steps of Adam (batches of 256) per probe.")
flags.DEFINE_integer("refit_steps", 0, "Steps of training p(y|z2) alone on the ELBO (0: none).")
flags.DEFINE_integer("seed", 0, "Seed of the draws and the probes' initial weights.")
cli.define_thread_flags()
flags.mark_flag_as_required("model_dir")
FLAGS = flags.FLAGS


def main(argv):
    cli.start(argv, "; usage: python experiments/cascade.py --model_dir RUN")
    if min(FLAGS.train_images, FLAGS.test_images, FLAGS.draws, FLAGS.hidden,
           FLAGS.probe_steps) < 1 or FLAGS.refit_steps < 0:
        sys.exit("error: --train_images, --test_images, --draws, --hidden and --probe_steps "
                 "must be >= 1 and --refit_steps >= 0")
    try:
        results = probes.study(FLAGS.model_dir, FLAGS.train_images, FLAGS.test_images,
                               FLAGS.draws, FLAGS.hidden, FLAGS.probe_steps, FLAGS.refit_steps,
                               FLAGS.seed, log=lambda m: print(m, file=sys.stderr))
    except (data.DataError, rundir.RunError) as e:
        sys.exit(f"error: {e}")
    print(probes.markdown(results))


if __name__ == "__main__":
    cli.run(main, __name__)
