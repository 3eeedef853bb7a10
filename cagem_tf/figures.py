"""Image grids of samples and reconstructions, and the TensorBoard Projector files of z2."""

import os

import numpy as np
import tensorflow as tf


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


def write_projector(directory: str, embeddings, labels):
    """Files the TensorBoard Projector reads: a checkpoint holding `embeddings` [N,d], one label
    per row in metadata.tsv, and projector_config.pbtxt naming both."""
    os.makedirs(directory, exist_ok=True)
    variable = tf.Variable(np.asarray(embeddings, np.float32), name="z2_means")
    tf.train.Checkpoint(z2_means=variable).write(os.path.join(directory, "embedding.ckpt"))
    with open(os.path.join(directory, "metadata.tsv"), "w") as f:
        f.write("".join(f"{int(label)}\n" for label in labels))
    with open(os.path.join(directory, "projector_config.pbtxt"), "w") as f:
        f.write('model_checkpoint_path: "embedding.ckpt"\n'
                'embeddings {\n  tensor_name: "z2_means/.ATTRIBUTES/VARIABLE_VALUE"\n'
                '  metadata_path: "metadata.tsv"\n}\n')
