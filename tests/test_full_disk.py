"""A real full file system: a small tmpfs mounted by the test, filled up, so that the kernel's
own ENOSPC reaches TensorFlow's, NumPy's, matplotlib's and the library's writers. Nothing
written before may be lost, nothing half-written left. Needs root and permission to mount
(skips with the reason otherwise)."""

import os
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from cagem_tf import figures, files, serving, training
from cagem_tf.config import Config
from conftest import clustered_npz, tiny_cagem

pytestmark = pytest.mark.e2e


@pytest.fixture
def disk(tmp_path):
    """A 16 MiB tmpfs at tmp_path/disk, unmounted afterwards."""
    path = tmp_path / "disk"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'not root'})")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(path):
    """Fills the file system of `path` to the last byte."""
    with open(os.path.join(path, "ballast"), "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
        try:
            while True:
                f.write(b"\0")
                f.flush()
        except OSError:
            pass


def _listing(path):
    return sorted(os.path.relpath(os.path.join(d, f), path)
                  for d, _, names in os.walk(path) for f in names)


def test_figures_and_the_projector_on_a_full_disk_keep_the_files_before_and_leave_no_part(disk):
    out = str(disk / "figures")
    os.makedirs(out)
    image = np.random.default_rng(0).random((16, 16, 1)).astype(np.float32)
    figures.save_png(image, os.path.join(out, "grid.png"))
    means, labels = np.random.default_rng(1).normal(size=(50, 4)), np.arange(50) % 3
    figures.pca_plot(means, labels, os.path.join(out, "pca.png"), "before")
    figures.write_projector(out, {"z2_means": means}, {"label": labels})
    before = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}
    _fill(disk)
    for write in (lambda: figures.save_png(image * 0.5, os.path.join(out, "grid.png")),
                  lambda: figures.pca_plot(means * 2, labels, os.path.join(out, "pca.png"),
                                           "after"),
                  lambda: figures.write_projector(out, {"z2_means": means * 2},
                                                  {"label": labels})):
        with pytest.raises(files.FileError, match="No space left on device") as error:
            write()
        assert "\n" not in str(error.value)
    after = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}
    assert after == before  # the old files intact, no temporary left


def test_an_export_on_a_full_disk_keeps_the_earlier_version(disk):
    model = tiny_cagem(image_shape=(4, 4, 1))
    export_dir = str(disk / "export")
    serving.export(model, export_dir, iw_samples=(10,))
    first = _listing(export_dir)
    _fill(disk)
    with pytest.raises(serving.ExportError, match="could not write the export") as error:
        serving.export(model, export_dir, iw_samples=(10,))
    assert "\n" not in str(error.value)
    assert _listing(export_dir) == first
    assert tf.saved_model.load(os.path.join(export_dir, "1")).signatures["classify"] is not None


def test_training_on_a_full_disk_stops_in_one_line_with_the_last_checkpoint_intact(disk, tmp_path):
    data = clustered_npz(tmp_path / "tiny.npz", 4, 120, 20)
    run = str(disk / "run")
    config = Config(dataset=data, model_dir=run, epochs=1, labels=3, hidden_lower=[8],
                    hidden_upper=[8], z1_dim=2, z2_dim=2, batch_size=40, eval_every=1,
                    eval_iw_samples=5, eval_subset=20, export_every=0, verbose=0)
    training.train(config, log=lambda m: None)
    kept = tf.train.latest_checkpoint(os.path.join(run, "checkpoints"))
    assert kept.endswith("ckpt-1")
    before = set(_listing(run))
    _fill(disk)
    lines = []
    with pytest.raises((training.TrainingError, files.FileError)) as error:
        training.train(config.replace(epochs=3), log=lines.append)
    assert "\n" not in str(error.value) and "No space left" in str(error.value)
    # The checkpoint of epoch 1 still restores; what is there is what was there, plus at most
    # event files that grew (TensorBoard appends), and no half-written checkpoint or temporary.
    assert tf.train.latest_checkpoint(os.path.join(run, "checkpoints")) == kept
    new = set(_listing(run)) - before
    assert all(".tmp" not in name and "ckpt-2" not in name and "ckpt-3" not in name
               for name in new), new
    os.remove(os.path.join(disk, "ballast"))
    resumed = training.train(config.replace(epochs=2), log=lines.append)
    assert np.isfinite(resumed["loss"])
    assert tf.train.latest_checkpoint(os.path.join(run, "checkpoints")).endswith("ckpt-2")
