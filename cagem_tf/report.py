"""The evaluation report of a trained run: results.json, results.md and figures.

`evaluate(model_dir, ...)` scores the run's test images (binarized once with the run's seed):
the bounds F_S with the standard error of their mean over images, the classifier errors (runs
with labels), cluster use (`evaluation.cluster_report`), active units and KL per unit. IW bounds
are saved per batch: a rerun continues where an interrupted one stopped, with the same numbers.
"""

import os

import numpy as np
import tensorflow as tf

from cagem_tf import evaluation, figures, files, objective, rundir
from cagem_tf.config import ConfigError

# results.json's cluster_use: how q(y|x) uses the clusters, and two pieces of the cascade.
CLUSTER_USE_KEYS = ("clusters_used", "mutual_information", "mean_entropy", "occupancy",
                    "purity", "nmi", "ari", "cluster_by_label", "agreement_pq",
                    "cross_entropy_p_y")


def evaluate(model_dir, checkpoint=None, iw_samples=(1, 10, 5000), subset=0, batch_size=100,
             chunk_size=None, split="test", figures_too=True, seed=0, progress=True, log=print,
             iw_estimator="exact", figures_dir=None) -> dict:
    """Evaluates the run in `model_dir`; returns the results dict also written to disk
    (RUN/evaluation; the figures to `figures_dir` when given)."""
    if not iw_samples or min(iw_samples) < 1 or subset < 0 or batch_size < 1 or (
            chunk_size is not None and chunk_size < 1):
        raise ConfigError("--eval_iw_samples, --batch_size and --chunk_size must be >= 1 "
                              "and --eval_subset >= 0")
    run = rundir.RunDir(model_dir)
    config, x, y, num_classes = rundir.evaluation_images(model_dir, subset, split, log)
    checkpoint = checkpoint or run.latest_checkpoint()  # one checkpoint, read once
    model = rundir.load_model(model_dir, checkpoint)
    with files.Lock(model_dir, "evaluation"):
        n = len(x)
        os.makedirs(run.evaluation, exist_ok=True)
        partial = run.partial(checkpoint, split)
        results = {"split": split, "images": n, "checkpoint": checkpoint,
                   "labels": config.labels, "clusters": model.num_clusters,
                   "iw_estimator": iw_estimator, "seed": seed,
                   "per_image_bounds": os.path.relpath(partial, run.path), "bounds": {}}
        for s in iw_samples:
            values = evaluation.iw_bounds(model, x, s, partial, seed, batch_size, chunk_size,
                                          progress, iw_estimator)
            path = evaluation.iw_bounds_file(partial, iw_estimator, s, seed, n, batch_size,
                                             chunk_size)
            results["bounds"][str(s)] = {"mean": float(np.mean(values)),
                                         "stderr": float(np.std(values) / np.sqrt(n)),
                                         "per_image": os.path.relpath(path, run.path)}
            if model.reports_bits:
                results["data_dim"] = model.data_dim
                results["bounds"][str(s)]["bits_per_dim"] = float(
                    objective.bits_per_dim(np.mean(values), model.data_dim))
        clusters = evaluation.cluster_report(model, x, y, num_classes, seed,
                                             classifiers=bool(config.labels))
        if config.labels:
            for key in ("error_p", "error_q", "error_posterior"):
                results[key] = clusters[key]
            results["posterior_samples"] = evaluation.POSTERIOR_SAMPLES
        results["cluster_use"] = {k: v for k, v in clusters.items() if k in CLUSTER_USE_KEYS}
        latent = evaluation.latent_summary(model, x, seed)
        results.update({k: v for k, v in latent.items() if not k.endswith("_means")})
        files.write_json(os.path.join(run.evaluation, "results.json"), results)
        files.write_file(os.path.join(run.evaluation, "results.md"),
                          lambda f: f.write(markdown(results)))
        if figures_too:
            write_figures(model, x, y, latent, clusters, run, seed, figures_dir)
        log(markdown(results))
        return results


def markdown(results) -> str:
    """results.md: one table of every measure."""
    lines = [f"{results['split']} images: {results['images']}, checkpoint "
             f"{os.path.basename(results['checkpoint'] or '')}, IW estimator "
             f"{results['iw_estimator']}", "",
             "| measure | value |", "|---|---|"]
    for s, bound in results["bounds"].items():
        lines.append(f"| F_{s} (nats) | {bound['mean']:.2f} ± {bound['stderr']:.2f} |")
        if "bits_per_dim" in bound:
            lines.append(f"| F_{s} (bits per dimension) | {bound['bits_per_dim']:.4f} |")
    for key, name in (("error_p", "test error p(y|x), cascade (the paper's)"),
                      ("error_posterior", "test error p(y|x), the model's posterior (IS-"
                       f"{results.get('posterior_samples')})"),
                      ("error_q", "test error q(y|x)")):
        if key in results:
            lines.append(f"| {name} | {100 * results[key]:.2f}% |")
    use = results.get("cluster_use", {})
    if use:
        lines.append(f"| clusters used (>= 2% of images) | {use['clusters_used']} of "
                     f"{results['clusters']} |")
        lines.append(f"| images per cluster (argmax q(y\\|x)) | "
                     f"{', '.join(map(str, use['occupancy']))} |")
        lines.append(f"| I(x;y) (nats) | {use['mutual_information']:.3f} |")
        lines.append(f"| mean entropy of q(y\\|x) (nats) | {use['mean_entropy']:.3f} |")
        lines.append(f"| purity / NMI / ARI against the labels | {use['purity']:.3f} / "
                     f"{use['nmi']:.3f} / {use['ari']:.3f} |")
        if "agreement_pq" in use:
            lines.append(f"| argmax p(y\\|x) = argmax q(y\\|x) | "
                         f"{100 * use['agreement_pq']:.1f}% |")
            lines.append(f"| E_q[-log p(y\\|z2)] (nats) | {use['cross_entropy_p_y']:.3f} |")
    lines.append(f"| active units z1 / z2 | {results['active_units_z1']} / "
                 f"{results['active_units_z2']} |")
    lines.append(f"| KL[q(z2\\|x,y) \\|\\| p(z2)] (nats) | {results['kl_q_z2_p_z2']:.2f} |")
    return "\n".join(lines) + "\n"


def write_figures(model, x, y, latent, clusters, run: rundir.RunDir, seed, out_dir=None):
    """PNG files in `out_dir` (default the run's evaluation/) and TensorBoard images in
    logs/evaluation: samples,
    class-conditional samples, reconstructions, cluster occupancy and cluster-by-label counts,
    PCA of z1 and z2 means (Figure 5), and with dim(z2) = 2 the z2 mesh (Figure 3)."""
    out_dir = out_dir or run.evaluation
    os.makedirs(out_dir, exist_ok=True)
    images = figures.evaluation_images(model, x, clusters, [seed, 7])
    if model.spec.z2_dim == 2:
        images["z2_mesh"], images["z2_mesh_class_conditional"] = figures.z2_mesh(model)
    writer = tf.summary.create_file_writer(run.logs("evaluation"))
    with writer.as_default(step=0):
        for name, image in images.items():
            figures.save_png(image, os.path.join(out_dir, f"{name}.png"))
            tf.summary.image(name, image[None])
    writer.flush()
    for layer in ("z1", "z2"):
        figures.pca_plot(latent[f"{layer}_means"], y,
                         os.path.join(out_dir, f"pca_{layer}.png"),
                         f"PCA of the {layer} means")


def per_image_bounds(model_dir: str, samples: int, results: dict | None = None):
    """The per-image IW bounds [N] of a run's last evaluation with `samples` samples."""
    run = rundir.RunDir(model_dir)
    results = results or files.read_json(os.path.join(run.evaluation, "results.json"))
    bound = results["bounds"].get(str(samples), {})
    if "per_image" in bound:
        path = run.join(bound["per_image"])
    else:  # earlier versions: named without batch and chunk, at first in evaluation/partial
        directory = run.join(results.get("per_image_bounds",
                                         os.path.join("evaluation", "partial")))
        path = os.path.join(directory, f"iw_{results['iw_estimator']}_{samples}_seed"
                                       f"{results.get('seed', 0)}_n{results['images']}.npy")
    if not os.path.isfile(path):
        raise rundir.RunError(f"{model_dir}: no per-image F_{samples} ({path}); evaluate it "
                              "with the same --eval_iw_samples")
    return np.load(path)


def paired_difference(model_dir: str, baseline_dir: str, samples: int,
                      results: dict | None = None, baseline_results: dict | None = None) -> tuple:
    """(mean, standard error) over images of F_S(run) - F_S(baseline), paired per image (both
    scored on the same images, so the difference is measured far more precisely than the
    means). results, baseline_results: the runs' results.json when already read."""
    difference = (per_image_bounds(model_dir, samples, results)
                  - per_image_bounds(baseline_dir, samples, baseline_results))
    return float(difference.mean()), float(difference.std() / np.sqrt(len(difference)))


def paired_table(run_dirs: dict, baseline: str, samples: int) -> str:
    """Markdown: F_S of each run ({name: run directory}) minus that of the run named
    `baseline`, paired per image (`paired_difference`)."""
    results = {name: files.read_json(os.path.join(rundir.RunDir(d).evaluation, "results.json"))
               for name, d in run_dirs.items()}
    dims = {r.get("data_dim") for r in results.values()}
    bits = dims.pop() if len(dims) == 1 and None not in dims else None
    head = f"| run | F_{samples} - {baseline} (nats, paired per image) |"
    lines = [head + (" the same in bits per dimension |" if bits else ""),
             "|---|---|" + ("---|" if bits else "")]
    for name, run_dir in run_dirs.items():
        mean, stderr = paired_difference(run_dir, run_dirs[baseline], samples, results[name],
                                         results[baseline])
        row = f"| {name} | {mean:+.2f} ± {stderr:.2f} |"
        if bits:  # a higher bound is fewer bits
            row += (f" {objective.bits_per_dim(mean, bits):+.4f} ± "
                    f"{-objective.bits_per_dim(stderr, bits):.4f} |")
        lines.append(row)
    return "\n".join(lines) + "\n"


def comparison_table(rows, samples) -> str:
    """One Markdown row per evaluated run: rows of (name, results with train_seconds and
    eval_seconds)."""
    head = ["run", "labels", "K"] + [f"F_{s}" for s in samples] + [
        "error p(y|x) cascade", "error p(y|x) posterior", "error q(y|x)", "clusters used",
        "I(x;y)", "NMI", "active z1/z2",
        "KL z2", "train (min)", "eval (min)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows:
        use = r.get("cluster_use", {})
        cells = [name, str(r["labels"]), str(r["clusters"])]
        cells += [f"{r['bounds'][s]['mean']:.2f} ± {r['bounds'][s]['stderr']:.2f}"
                  + (f" ({r['bounds'][s]['bits_per_dim']:.4f} bits/dim)"
                     if "bits_per_dim" in r["bounds"][s] else "") for s in samples]
        cells += [f"{100 * r[k]:.2f}%" if k in r else "-"
                  for k in ("error_p", "error_posterior", "error_q")]
        cells += [str(use.get("clusters_used", "-")),
                  f"{use['mutual_information']:.2f}" if use else "-",
                  f"{use['nmi']:.2f}" if use else "-"]
        cells += [f"{r['active_units_z1']}/{r['active_units_z2']}", f"{r['kl_q_z2_p_z2']:.2f}",
                  f"{r['train_seconds'] / 60:.1f}", f"{r['eval_seconds'] / 60:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
