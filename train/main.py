"""Train CaGeM: python train/main.py --dataset mnist --labels 20 [--flagfile experiments/...].

Rerunning the same command resumes the run in --model_dir; see README.md for the run directory.
"""

import os
import sys

# Run as a script from a checkout: make the repository root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from cagem_tf import cli, training  # noqa: E402
from export import saved_model  # noqa: E402

D = training.DEFAULTS
flags.DEFINE_string("dataset", D["dataset"], "tfds name (mnist, fashion_mnist, kmnist, "
                    "omniglot), an .npz file (x_train, y_train, x_test, y_test) or a directory "
                    "of the four MNIST IDX files.")
flags.DEFINE_integer("labels", D["labels"], "Labelled training points, the same number per "
                     "class; 0 trains unsupervised.")
flags.DEFINE_integer("clusters", D["clusters"], "K, the values of y; 0 means the number of "
                     "classes, the only K allowed when --labels > 0.")
flags.DEFINE_integer("epochs", D["epochs"], "Epochs (passes over the training set) in all, "
                     "counting those of a resumed run.")
flags.DEFINE_integer("batch_size", D["batch_size"], "Unlabelled examples per step.")
flags.DEFINE_integer("labelled_batch_size", D["labelled_batch_size"],
                     "Labelled examples per step (at most --labels).")
flags.DEFINE_float("beta", D["beta"], "alpha = beta * (N_u + N_l) / N_l weighs the labelled "
                   "cross-entropies.")
flags.DEFINE_float("learning_rate", D["learning_rate"], "Initial Adam learning rate.")
flags.DEFINE_float("lr_decay", D["lr_decay"], "Learning rate factor every --lr_decay_epochs.")
flags.DEFINE_integer("lr_decay_epochs", D["lr_decay_epochs"], "Epochs between decays.")
flags.DEFINE_integer("warmup_epochs", D["warmup_epochs"], "Epochs of KL warm-up (temperature "
                     "linear from 0 to 1); 0 disables it.")
flags.DEFINE_integer("z1_dim", D["z1_dim"], "Size of z1.")
flags.DEFINE_integer("z2_dim", D["z2_dim"], "Size of z2.")
flags.DEFINE_list("hidden_lower", [str(w) for w in D["hidden_lower"]], "Hidden widths of "
                  "q(z1|x), q(y|z1,x), p(x|y,z1); one value w means [w, w].")
flags.DEFINE_list("hidden_upper", [str(w) for w in D["hidden_upper"]], "Hidden widths of "
                  "q(z2|x,y,z1), p(z1|y,z2), p(y|z2); one value w means [w, w].")
flags.DEFINE_bool("skip_connection", D["skip_connection"], "Give q(z2|x,y,z1) the input x.")
flags.DEFINE_integer("num_samples", D["num_samples"], "Samples of z1 (and z2 per y) in the "
                     "training ELBO.")
flags.DEFINE_integer("seed", D["seed"], "Seed of the labelled subset, the data order and the "
                     "model's sampling.")
flags.DEFINE_string("model_dir", D["model_dir"], "Run directory: config, checkpoints, logs, "
                    "exports.")
flags.DEFINE_string("data_dir", D["data_dir"], "tensorflow-datasets data directory.")
flags.DEFINE_string("manual_dir", D["manual_dir"], "Folder with the data set's original files "
                    "(e.g. the four MNIST .gz files) for tfds to prepare offline.")
flags.DEFINE_integer("validation", D["validation"], "Hold out this many training examples "
                     "and evaluate on them instead of the test set.")
flags.DEFINE_enum("test_binarization", D["test_binarization"], ["fixed", "dynamic"],
                  "Binarize the evaluation images once (fixed seed) or at every pass.")
flags.DEFINE_integer("eval_every", D["eval_every"], "Epochs between evaluations; 0: none.")
flags.DEFINE_integer("eval_iw_samples", D["eval_iw_samples"], "Importance samples of the "
                     "evaluation's IW bound; 0 skips it.")
flags.DEFINE_integer("eval_subset", D["eval_subset"], "Evaluation images (the first ones).")
flags.DEFINE_integer("export_every", D["export_every"], "Epochs between SavedModel exports; "
                     "0: only at the end.")
flags.DEFINE_integer("keep_checkpoints", D["keep_checkpoints"], "Checkpoints kept.")
flags.DEFINE_enum("strategy", D["strategy"], list(training.STRATEGIES), "tf.distribute "
                  "strategy; multi_worker reads TF_CONFIG.")
flags.DEFINE_bool("fresh", D["fresh"], "Start over: an existing run in --model_dir is moved "
                  "aside to <model_dir>.<time>.")
flags.DEFINE_integer("verbose", D["verbose"], "Keras progress: 0 silent, 1 bar, 2 a line per "
                     "epoch.")
flags.DEFINE_float("clip_norm", D["clip_norm"], "Clip the gradient to this global norm; 0: "
                   "no clipping (the paper does not say).")
flags.DEFINE_float("y_init_stddev", D["y_init_stddev"], "Initialise the first-layer weights of "
                   "the one-hot y from N(0, s^2); 0: Glorot (the paper does not say).")
flags.DEFINE_bool("shared_noise", D["shared_noise"], "One noise draw for z2 in every y branch "
                  "(common random numbers; the same objective in expectation).")
flags.DEFINE_float("cluster_usage", D["cluster_usage"], "DEPARTURE from the paper: weight of "
                   "the batch's cluster entropy H(mean q(y|x)) added to the objective, annealed "
                   "to 0 over --departure_epochs.")
flags.DEFINE_float("pseudo_labels", D["pseudo_labels"], "DEPARTURE from the paper: weight of "
                   "a cross-entropy of q(y|z1,x) on k-means labels of the unlabelled images "
                   "(restricted to the classifier networks), annealed to 0 over "
                   "--departure_epochs.")
flags.DEFINE_integer("departure_epochs", D["departure_epochs"], "Epochs over which "
                     "--cluster_usage and --pseudo_labels fall linearly to 0.")
cli.define_thread_flags()
FLAGS = flags.FLAGS


def config_from_flags() -> dict:
    config = {name: FLAGS[name].value for name in training.DEFAULTS}
    for key in ("hidden_lower", "hidden_upper"):
        try:
            widths = [int(w) for w in config[key]]
        except ValueError:
            raise training.rundir.RunError(f"--{key} {','.join(config[key])}: give integers, "
                                           "e.g. 1024 or 1024,512") from None
        config[key] = widths * 2 if len(widths) == 1 else widths
    return config


def main(argv):
    cli.start(argv, "; flags look like --labels 20")
    try:
        training.train(config_from_flags(), exporter=saved_model.export)
    except (training.data.DataError, training.rundir.RunError, training.TrainingError,
            saved_model.ExportError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
