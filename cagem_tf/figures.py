"""Every picture of a model: image grids of samples and reconstructions, cluster charts, PCA
plots, and the TensorBoard Projector files of z2."""

import os

import numpy as np
import tensorflow as tf

from cagem_tf import files


def grid(images, columns: int):
    """images [N,H,W,1] in [0,1] -> one image [rows*H, columns*W, 1]; missing cells are black."""
    images = np.asarray(images, np.float32)
    n, h, w, c = images.shape
    rows = -(-n // columns)
    canvas = np.zeros([rows * columns, h, w, c], np.float32)
    canvas[:n] = images
    return canvas.reshape(rows, columns, h, w, c).transpose(0, 2, 1, 3, 4).reshape(
        rows * h, columns * w, c)


def class_grid(model, per_class: int, seed):
    """One row per cluster y, `per_class` samples of p(x|y) with z2 ~ p(z2), z1 ~ p(z1|y,z2)."""
    y = np.repeat(np.arange(model.num_clusters), per_class).astype(np.int32)
    return grid(model.sample(len(y), y=y, seed=seed)[0].numpy(), per_class)


def reconstruction_grid(model, x):
    """First row the images x [N,...], second row their reconstructions."""
    x = np.asarray(x, np.float32).reshape(-1, *model.image_shape)
    return grid(np.concatenate([x, model.reconstruct(x).numpy()]), len(x))


def evaluation_images(model, x, clusters: dict, seed, per_class: int = 10) -> dict:
    """The images every evaluation shows (TensorBoard's and the report's): 100 samples, one
    row of samples per cluster, the first 10 images of x over their reconstructions, and the
    charts of a `cluster_report` (occupancy, cluster by label)."""
    seed = tf.constant(seed, tf.int32)
    return {"samples": grid(model.sample(100, seed=seed)[0].numpy(), 10),
            "class_conditional": class_grid(model, per_class, seed),
            "reconstructions": reconstruction_grid(model, x[:10]),
            "occupancy": occupancy_chart(clusters["occupancy"]),
            "cluster_by_label": cluster_label_chart(clusters["cluster_by_label"])}


def _rendered(fig):
    """A matplotlib figure as an RGB image [H,W,3] in [0,1]."""
    import matplotlib.pyplot as plt
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba(), np.float32)[..., :3] / 255.0
    plt.close(fig)
    return image


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def occupancy_chart(occupancy, title: str = "images per cluster (argmax q(y|x))"):
    """Bars of the images per cluster, [H,W,3]."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3), dpi=80)
    ax.bar(np.arange(len(occupancy)), occupancy, color="tab:blue")
    ax.set_xlabel("cluster y")
    ax.set_ylabel("images")
    ax.set_title(title, fontsize=9)
    return _rendered(fig)


def cluster_label_chart(table):
    """The cluster-by-label counts [K,C] as a shaded table with the counts written in, [H,W,3]."""
    plt = _pyplot()
    table = np.asarray(table)
    fig, ax = plt.subplots(figsize=(1 + 0.45 * table.shape[1], 1 + 0.35 * table.shape[0]),
                           dpi=80)
    ax.imshow(table, cmap="Blues", aspect="auto")
    if table.size <= 400:
        for (k, c), n in np.ndenumerate(table):
            ax.text(c, k, str(n), ha="center", va="center", fontsize=6,
                    color="white" if n > table.max() / 2 else "black")
    ax.set_xlabel("label")
    ax.set_ylabel("cluster y")
    ax.set_title("images per cluster and label", fontsize=9)
    return _rendered(fig)


def write_projector(directory: str, embeddings: dict, columns: dict):
    """Files the TensorBoard Projector reads, written into `directory`: one tab-separated
    tensor file per embedding (`embeddings`: name -> [N,d] values), metadata.tsv with a header
    row and one row per point (`columns`: name -> [N] values), and projector_config.pbtxt naming
    them by paths relative to itself, which TensorBoard resolves against the config file (a
    relative checkpoint path it would resolve against its own working directory instead).
    TensorBoard looks for the config in each run's directory (one holding event files) and in
    the log directory itself. Each file is written aside and renamed into place."""
    os.makedirs(directory, exist_ok=True)

    def write(name, text):
        files.write_file(os.path.join(directory, name), lambda f: f.write(text))

    names = list(columns)
    rows = zip(*[np.asarray(columns[c]).tolist() for c in names])
    write("metadata.tsv", "\t".join(names) + "\n"
          + "".join("\t".join(str(v) for v in row) + "\n" for row in rows))
    config = []
    for name, values in embeddings.items():
        values = np.asarray(values, np.float32)
        write(f"{name}.tsv", "".join("\t".join(f"{v:.6g}" for v in row) + "\n"
                                     for row in values))
        config.append(f'embeddings {{\n  tensor_name: "{name}"\n  tensor_path: "{name}.tsv"\n'
                      f'  tensor_shape: {values.shape[0]}\n  tensor_shape: {values.shape[1]}\n'
                      f'  metadata_path: "metadata.tsv"\n}}\n')
    write("projector_config.pbtxt", "".join(config))


def save_png(image, path: str) -> None:
    """An image [H,W,C] in [0,1] (C = 1 or 3) as a PNG file (TensorFlow's encoder)."""
    data = tf.cast(tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255), tf.uint8)
    png = tf.io.encode_png(data).numpy()
    files.write_file(path, lambda f: f.write(png), mode="wb")


def z2_mesh(model, per_side: int = 10, extent: float = 2.5, seed=(0, 0)):
    """For dim(z2) = 2 (the paper's Figure 3): generations on a per_side x per_side mesh over
    [-extent, extent]^2 of z2, (random y ~ p(y|z2), class-conditional blocks one per y)."""
    if model.spec.z2_dim != 2:
        raise ValueError("the z2 mesh needs z2_dim = 2")
    axis = np.linspace(-extent, extent, per_side, dtype=np.float32)
    mesh = np.stack(np.meshgrid(axis, axis[::-1]), -1).reshape(-1, 2)
    seed = tf.constant(seed, tf.int32)
    random = grid(model.sample(len(mesh), z2=mesh, seed=seed)[0].numpy(), per_side)
    blocks = [grid(model.sample(len(mesh), y=np.full(len(mesh), c, np.int32), z2=mesh,
                                seed=seed)[0].numpy(), per_side)
              for c in range(model.num_clusters)]
    return random, grid(np.stack(blocks), min(5, len(blocks)))


def pca_plot(means, labels, path: str, title: str) -> None:
    """Scatter of the first two principal components of means [N,d], coloured by label."""
    plt = _pyplot()
    centred = np.asarray(means, np.float64) - np.mean(means, axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ components[:2].T
    if projected.shape[1] == 1:
        projected = np.concatenate([projected, np.zeros_like(projected)], axis=1)
    fig, ax = plt.subplots(figsize=(5, 5))
    points = ax.scatter(projected[:, 0], projected[:, 1], c=labels, cmap="tab10", s=4)
    fig.colorbar(points, ax=ax, label="label")
    ax.set_title(title)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    _save_figure(plt, fig, path)


def likelihood_vs_labels(rows, path: str) -> None:
    """The paper's Figure 4: rows of (labels, {S: F_S}) -> F_S against the number of labels."""
    plt = _pyplot()
    rows = sorted(rows, key=lambda row: row[0])
    fig, ax = plt.subplots(figsize=(5, 4))
    for s in sorted({s for _, bounds in rows for s in bounds}, key=int):
        points = [(labels, bounds[s]) for labels, bounds in rows if s in bounds]
        ax.plot(*zip(*points), marker="o", label=f"F_{s}")
    ax.set_xlabel("labelled examples")
    ax.set_ylabel("test log-likelihood bound (nats)")
    ax.legend()
    _save_figure(plt, fig, path)


def _save_figure(plt, fig, path: str) -> None:
    """A matplotlib figure as a PNG file, written whole or not at all; the figure is closed
    either way."""
    try:
        files.write_file(path, lambda f: fig.savefig(f, format="png", dpi=100,
                                                     bbox_inches="tight"), mode="wb")
    finally:
        plt.close(fig)
