"""Evaluate a trained run: python train/evaluate.py --model_dir RUN [--iw_samples 1,10,5000].

Writes RUN/evaluation/results.json and results.md (IW bounds with standard errors, classifier
errors, active units, KL per unit), figures as PNG files in RUN/evaluation/, and the same images
to TensorBoard (RUN/logs/evaluation). IW bounds are saved per batch: a rerun continues where an
interrupted one stopped and gives the same numbers.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from cagem_tf import cli, data, evaluation, rundir, training  # noqa: E402

flags.DEFINE_string("model_dir", None, "Run directory written by train/main.py.")
flags.DEFINE_string("checkpoint", None, "Checkpoint prefix; default: the latest.")
flags.DEFINE_list("iw_samples", ["1", "10", "5000"], "Sample counts S of the bounds F_S.")
flags.DEFINE_integer("subset", 0, "Evaluate the first N test images only (0: all).")
flags.DEFINE_integer("batch_size", 100, "Images per IW batch (the unit of saved progress).")
flags.DEFINE_integer("chunk_size", None, "Importance samples per chunk (memory); default 100 "
                     "for the exact estimator, 500 for the sampled one.")
flags.DEFINE_enum("split", "test", ["test", "validation"], "test: the data set's test split; "
                  "validation: the run's --validation hold-out.")
flags.DEFINE_enum("iw_estimator", "exact", ["exact", "sampled"], "exact: y summed inside "
                  "every importance weight; sampled: y ~ q(y|z1,x) per sample (cheaper, "
                  "more variance).")
flags.DEFINE_bool("figures", True, "Write the figures.")
flags.DEFINE_integer("seed", 0, "Seed of the evaluation's sampling.")
cli.define_thread_flags()
flags.mark_flag_as_required("model_dir")
FLAGS = flags.FLAGS


def evaluate(model_dir, checkpoint=None, iw_samples=(1, 10, 5000), subset=0, batch_size=100,
             chunk_size=None, split="test", figures=True, seed=0, progress=True, log=print,
             iw_estimator="exact"):
    """Evaluates the run in `model_dir`; returns the results dict also written to disk."""
    import numpy as np
    import tensorflow as tf

    if min(iw_samples) < 1 or subset < 0 or batch_size < 1 or (chunk_size is not None
                                                                 and chunk_size < 1):
        raise rundir.RunError("--iw_samples, --batch_size and --chunk_size must be >= 1 and "
                              "--subset >= 0")
    config, x, y = training.evaluation_images(model_dir, subset, split, log)
    model = training.load_trained(model_dir, checkpoint)
    n = len(x)
    out_dir = os.path.join(model_dir, "evaluation")
    os.makedirs(out_dir, exist_ok=True)

    results = {"split": split, "images": n, "checkpoint": checkpoint or
               tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints")),
               "labels": config["labels"], "clusters": model.num_clusters,
               "iw_estimator": iw_estimator, "bounds": {}}
    for s in iw_samples:
        values = evaluation.iw_bounds(model, x, s, os.path.join(out_dir, "partial"), seed,
                                      batch_size, chunk_size, progress, iw_estimator)
        results["bounds"][str(s)] = {"mean": float(np.mean(values)),
                                     "stderr": float(np.std(values) / np.sqrt(n))}
    if config["labels"]:
        results["error_p"], results["error_q"] = evaluation.classifier_errors(model, x, y, seed)
    results["clusters_report"] = evaluation.cluster_report(model, x, y, None, seed)
    latent = evaluation.latent_summary(model, x, seed)
    results.update({k: v for k, v in latent.items() if not k.endswith("_means")})
    rundir.write_json(os.path.join(out_dir, "results.json"), results)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(results))
    if figures:
        write_figures(model, x, y, latent, out_dir, os.path.join(model_dir, "logs",
                                                                 "evaluation"), seed)
    log(markdown(results))
    return results


def markdown(results) -> str:
    lines = [f"{results['split']} images: {results['images']}, checkpoint "
             f"{os.path.basename(results['checkpoint'] or '')}, IW estimator "
             f"{results['iw_estimator']}", "",
             "| measure | value |", "|---|---|"]
    for s, bound in results["bounds"].items():
        lines.append(f"| F_{s} (nats) | {bound['mean']:.2f} ± {bound['stderr']:.2f} |")
    for key, name in (("error_p", "test error p(y|x)"), ("error_q", "test error q(y|x)")):
        if key in results:
            lines.append(f"| {name} | {100 * results[key]:.2f}% |")
    lines.append(f"| active units z1 / z2 | {results['active_units_z1']} / "
                 f"{results['active_units_z2']} |")
    lines.append(f"| KL[q(z2\\|x,y) \\|\\| p(z2)] (nats) | {results['kl_q_z2_p_z2']:.2f} |")
    return "\n".join(lines) + "\n"


def write_figures(model, x, y, latent, out_dir, log_dir, seed):
    """PNG files and TensorBoard images: samples, class-conditional samples, reconstructions,
    PCA of z1 and z2 means (Figure 5), and with dim(z2) = 2 the z2 mesh (Figure 3)."""
    import tensorflow as tf
    from cagem_tf import figures

    s = tf.constant([seed, 7], tf.int32)
    images = {"samples": figures.grid(model.sample(100, seed=s)[0].numpy(), 10),
              "class_conditional": figures.class_grid(model, 10, s),
              "reconstructions": figures.reconstruction_grid(model, x[:10])}
    if model.z2_dim == 2:
        images["z2_mesh"], images["z2_mesh_class_conditional"] = figures.z2_mesh(model)
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default(step=0):
        for name, image in images.items():
            figures.save_png(image, os.path.join(out_dir, f"{name}.png"))
            tf.summary.image(name, image[None])
    writer.flush()
    for layer in ("z1", "z2"):
        figures.pca_plot(latent[f"{layer}_means"], y, os.path.join(out_dir, f"pca_{layer}.png"),
                         f"PCA of the {layer} means")


def main(argv):
    cli.start(argv)
    try:
        samples = [int(s) for s in FLAGS.iw_samples]
    except ValueError:
        sys.exit(f"error: --iw_samples {','.join(FLAGS.iw_samples)}: give integers, e.g. 1,10,5000")
    try:
        evaluate(FLAGS.model_dir, FLAGS.checkpoint, samples, FLAGS.subset, FLAGS.batch_size,
                 FLAGS.chunk_size, FLAGS.split, FLAGS.figures, FLAGS.seed,
                 iw_estimator=FLAGS.iw_estimator)
    except (data.DataError, rundir.RunError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
