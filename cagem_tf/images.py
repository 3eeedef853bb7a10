"""A user's own images, converted as the training data was: grayscale, H x W, ink bright, [0,1].

Sources: a folder of PNG/JPEG (also GIF, BMP) files, an .npz file (its first array, or `x_test`
/ `x` when present) or an IDX image file. A file image is decoded by TensorFlow, averaged to
grayscale when it has colour (said in a note), resized to the model's H x W with area
averaging when its size differs (noted), and inverted when its mean is above one half: the
training images have bright ink on a dark background. Arrays already of the model's size are
taken as they are (uint8 0-255 or floats in [0,1]). Nothing here needs more than TensorFlow
and NumPy.
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf

from cagem_tf.files import UserError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp")


@dataclasses.dataclass
class Loaded:
    """names [N], x float32 [N,H,W,C] in [0,1], notes {name: text}, errors {name: text} for
    the files that could not be used (not in names)."""
    names: list
    x: np.ndarray
    notes: dict
    errors: dict


class ImageError(UserError, ValueError):
    """No image could be read; the message is one line that says what to do."""


def _convert(image: np.ndarray, shape, notes: list) -> np.ndarray:
    """[h,w,c] uint8 -> [H,W,C] float32 in [0,1] for a model of `shape` (H,W,C): colour to
    grey for a grey model (said in `notes`), grey to colour (three equal channels) for a
    colour one; a grey image with a light background is inverted (ink bright, as in MNIST)."""
    image = tf.convert_to_tensor(image)
    if image.shape[-1] in (2, 4):  # drop alpha
        image = image[..., :-1]
    if image.shape[-1] == 3 and shape[-1] == 1:
        image = tf.image.rgb_to_grayscale(image)
        notes.append("colour converted to grayscale")
    elif image.shape[-1] == 1 and shape[-1] == 3:
        image = tf.image.grayscale_to_rgb(image)
        notes.append("grey converted to colour")
    image = tf.cast(image, tf.float32) / 255.0
    if tuple(image.shape[:2]) != tuple(shape[:2]):
        notes.append(f"resized from {image.shape[0]}x{image.shape[1]} to "
                     f"{shape[0]}x{shape[1]} (area)")
        image = tf.image.resize(image, shape[:2], method="area")
    if shape[-1] == 1 and float(tf.reduce_mean(image)) > 0.5:
        image = 1.0 - image
        notes.append("inverted (dark ink on a light background)")
    return tf.clip_by_value(image, 0.0, 1.0).numpy()


def _array_images(x: np.ndarray, shape, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == len(shape):
        x = x[..., None]
    if tuple(x.shape[1:]) != tuple(shape):
        raise ImageError(f"{what}: images of shape {tuple(x.shape[1:])}, the model takes "
                         f"{tuple(shape)}; resize them first or give PNG/JPEG files")
    if not len(x):
        raise ImageError(f"{what}: holds no image")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ImageError(f"{what}: values that are not finite (NaN or inf); give intensities "
                         "0-255 or floats in [0, 1]")
    if x.min() < 0 or x.max() > 255:
        raise ImageError(f"{what}: values from {x.min():g} to {x.max():g}; give "
                         "intensities 0-255 or floats in [0, 1]")
    return x / 255.0 if x.max() > 1.0 else x


def load(path: str, shape) -> Loaded:
    """The images at `path` for a model of image shape `shape` (H, W, C)."""
    from cagem_tf import data
    shape = tuple(shape)
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(EXTENSIONS))
        if not files:
            raise ImageError(f"{path}: no PNG or JPEG files; give a folder of images, an .npz "
                             "or an IDX file")
        names, images, notes, errors = [], [], {}, {}
        for name in files:
            try:
                raw = tf.io.decode_image(tf.io.read_file(os.path.join(path, name)),
                                         expand_animations=False).numpy()
            except (tf.errors.OpError, ValueError) as e:
                errors[name] = f"unreadable ({str(e).splitlines()[0][:80]}); replace the file"
                continue
            said = []
            images.append(_convert(raw, shape, said))
            names.append(name)
            if said:
                notes[name] = "; ".join(said)
        if not images:
            raise ImageError(f"{path}: none of the {len(files)} files could be read")
        return Loaded(names, np.stack(images), notes, errors)
    if not os.path.isfile(path):
        raise ImageError(f"{path}: no such file or folder")
    if path.endswith(".npz"):
        with np.load(path) as arrays:
            if not arrays.files:
                raise ImageError(f"{path}: the .npz holds no array; give one of images [N,H,W]")
            key = next((k for k in ("x_test", "x") if k in arrays), None) or arrays.files[0]
            x = _array_images(arrays[key], shape, f"{path}:{key}")
        return Loaded([f"{key}[{i}]" for i in range(len(x))], x, {}, {})
    try:
        x = data.read_idx(path)
    except data.DataError as e:
        raise ImageError(f"{path}: not a PNG/JPEG folder, .npz or IDX file ({e})") from None
    x = _array_images(x, shape, path)
    return Loaded([f"{os.path.basename(path)}[{i}]" for i in range(len(x))], x, {}, {})


def binarize(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """x ~ Bernoulli(intensity) once with `seed`, as the test images are."""
    from cagem_tf import data
    return data.binarize_once(x * np.float32(255), seed)
