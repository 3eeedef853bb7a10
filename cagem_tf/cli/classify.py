"""cagem-classify (export/classify.py): score your own images with an exported model,
--saved_model DIR (or --model_dir RUN for its newest export) --images PATH --out FILE.

PATH is a folder of PNG/JPEG files, an .npz file or an IDX image file; images are converted as
the training data was (`cagem_tf.images`) and, for a model of binarized images, binarized once with --seed. FILE gets one row per
image (.csv, or JSON lines for .jsonl): the class of the model's own posterior p(y|x)
(`class_posterior`; exports from before that signature lack its columns),
the class of the cascade p(y|x) (`class_p`) and the cluster of q(y|x) (`cluster_q`), their
distributions, the z2 mean and the log-likelihood bound. A file that cannot be used is named in
one line, and the other images are still scored. Needs TensorFlow alone.
"""

import csv
import json
import re
import sys

from absl import flags

from cagem_tf import cli

flags.DEFINE_string("saved_model", None, "A SavedModel version directory (e.g. RUN/export/3).")
flags.DEFINE_string("model_dir", None, "A run directory: its newest export is used.")
flags.DEFINE_string("images", None, "A folder of PNG/JPEG files, an .npz or an IDX file.")
flags.DEFINE_string("out", "scores.csv", "Output file: .csv, or .jsonl for JSON lines.")
flags.DEFINE_string("likelihood", None, "The likelihood signature (e.g. log_likelihood_1000); "
                    "default: the exact one with the fewest samples.")
flags.DEFINE_bool("binarize", None, "Binarize the images once, x ~ Bernoulli(intensity), as "
                  "the test images are; --nobinarize scores the intensities themselves. "
                  "Default: binarize for a model of binarized images (likelihood "
                  "bernoulli), not for one of 8-bit images (discretized_logistic).")
flags.DEFINE_integer("seed", 0, "Seed of the binarization.")
flags.DEFINE_integer("batch_size", 100, "Images per call.")
flags.mark_flag_as_required("images")
FLAGS = flags.FLAGS


def _saved_model_path():
    if bool(FLAGS.saved_model) == bool(FLAGS.model_dir):
        sys.exit("error: give --saved_model DIR or --model_dir RUN (one of them)")
    if FLAGS.saved_model:
        return FLAGS.saved_model
    from cagem_tf import rundir
    newest = rundir.RunDir(FLAGS.model_dir).newest_export()
    if newest is None:
        sys.exit(f"error: {FLAGS.model_dir} has no export yet; train an epoch or run cagem-export")
    return newest


def _rounded(values) -> list:
    """Six decimals, rounded in float64 so that the file shows them as such (0.00317, not
    the float32 nearest to it, 0.00316999992355704)."""
    return [round(float(v), 6) for v in values]


def main(argv):
    cli.start(argv)
    import numpy as np
    import tensorflow as tf
    from cagem_tf import files, images
    if FLAGS.batch_size < 1:
        sys.exit(f"error: --batch_size {FLAGS.batch_size}: must be at least 1")
    path = _saved_model_path()
    try:
        model = tf.saved_model.load(path)
    except OSError as e:
        sys.exit(f"error: --saved_model {path}: {str(e).splitlines()[0]}")
    likelihoods = sorted((s for s in model.signatures if re.fullmatch(r"log_likelihood_\d+", s)),
                         key=lambda s: int(s.rsplit("_", 1)[1]))
    name = FLAGS.likelihood or (likelihoods[0] if likelihoods else None)
    if name not in model.signatures:
        sys.exit(f"error: --likelihood {name}: the model has {', '.join(likelihoods)}")
    shape = model.signatures["classify"].structured_input_signature[1]["x"].shape[1:]
    try:
        loaded = images.load(FLAGS.images, shape)
    except files.UserError as e:
        sys.exit(f"error: {e}")
    for file, problem in loaded.errors.items():
        print(f"skipped {file}: {problem}", file=sys.stderr)

    likelihood = model.likelihood[0].numpy().decode() if hasattr(model, "likelihood") \
        else "bernoulli"  # exports before the likelihood choice
    binarize = FLAGS.binarize if FLAGS.binarize is not None else likelihood == "bernoulli"
    x = images.binarize(loaded.x, FLAGS.seed) if binarize else loaded.x
    posterior = "classify_posterior" in model.signatures
    rows = []
    for start in range(0, len(x), FLAGS.batch_size):
        xb = tf.constant(x[start:start + FLAGS.batch_size])
        classes = model.signatures["classify"](x=xb)
        if posterior:
            own = model.signatures["classify_posterior"](x=xb)["p_y"].numpy()
        z2 = model.signatures["encode"](x=xb)["z2"].numpy()
        bound = model.signatures[name](x=xb)["log_likelihood"].numpy()
        for i in range(len(xb)):
            p_y, q_y = classes["p_y"][i].numpy(), classes["q_y"][i].numpy()
            image = loaded.names[start + i]
            row = {"image": image}
            if posterior:
                row.update(class_posterior=int(np.argmax(own[i])),
                           posterior_y=_rounded(own[i]))
            rows.append({**row, "class_p": int(np.argmax(p_y)), "cluster_q": int(np.argmax(q_y)),
                         "p_y": _rounded(p_y), "q_y": _rounded(q_y), "z2": _rounded(z2[i]),
                         name: float(bound[i]), "note": loaded.notes.get(image, "")})

    def write(f):
        if FLAGS.out.endswith(".jsonl"):
            f.writelines(json.dumps(row) + "\n" for row in rows)
            return
        writer = csv.writer(f)
        labels = ["image"] + ["class_posterior"] * posterior + ["class_p", "cluster_q"]
        vectors = ["posterior_y"] * posterior + ["p_y", "q_y", "z2"]
        writer.writerow(labels + [f"{key}_{j}" for key in vectors
                                  for j in range(len(rows[0][key]))] + [name, "note"])
        for row in rows:
            writer.writerow([row[key] for key in labels] + [v for key in vectors for v in row[key]]
                            + [f"{row[name]:.4f}", row["note"]])

    try:
        files.write_file(FLAGS.out, write)
    except files.UserError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {len(rows)} rows to {FLAGS.out}"
          + (f"; skipped {len(loaded.errors)} files" if loaded.errors else ""))


def run():
    cli.run(main, __name__)


if __name__ == "__main__":
    run()
