"""Faults a user meets: a second process on one run, a damaged checkpoint, SIGTERM, a full disk.
Each test cleans up the processes it starts, also when it fails."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from cagem_tf import callbacks, files, rundir, serving, training
from cagem_tf.config import Config
from conftest import clustered_npz, tiny_cagem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(labels=6, hidden_lower=[8], hidden_upper=[8], z1_dim=2, z2_dim=2, batch_size=50,
            eval_every=0, verbose=0, export_every=-1)


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    return clustered_npz(tmp_path_factory.mktemp("data") / "tiny.npz", 6, 600, 60)


def _start(tiny_npz, run, epochs=200):
    """A real training process, slow enough to be caught mid-run."""
    args = [sys.executable, "train/main.py", f"--dataset={tiny_npz}", f"--model_dir={run}",
            f"--epochs={epochs}", "--labels=6", "--hidden_lower=64", "--hidden_upper=64",
            "--batch_size=10", "--eval_every=0", "--export_every=-1", "--verbose=0"]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def _wait_for_checkpoint(run, process, timeout=180):
    deadline = time.time() + timeout
    while not tf.train.latest_checkpoint(os.path.join(run, "checkpoints")):
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.5)


@pytest.mark.e2e
def test_a_second_process_is_refused_and_a_killed_holder_leaves_no_lock(tiny_npz, tmp_path,
                                                                        processes):
    run = str(tmp_path / "run")
    first = _start(tiny_npz, run)
    processes.append(first)
    _wait_for_checkpoint(run, first)
    second = _start(tiny_npz, run)
    processes.append(second)
    _, err = second.communicate(timeout=120)
    assert second.returncode != 0
    last = err.strip().splitlines()[-1]
    assert f"is in use by PID {first.pid} on " in last and "(training) since" in last, last
    assert first.poll() is None  # the holder goes on
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    done = int(tf.train.latest_checkpoint(os.path.join(run, "checkpoints")).rsplit("-", 1)[1])
    third = _start(tiny_npz, run, epochs=done + 1)
    processes.append(third)
    out, err = third.communicate(timeout=300)
    assert third.returncode == 0, err[-3000:]
    assert f"Resuming {run} after epoch {done}" in out + err


@pytest.mark.e2e
@pytest.mark.parametrize("signum,name", [(signal.SIGTERM, "SIGTERM"),
                                         (signal.SIGINT, "Ctrl-C (SIGINT)")])
def test_sigterm_or_ctrl_c_stops_within_seconds_keeping_the_last_finished_epoch(
        tiny_npz, tmp_path, processes, signum, name):
    run = str(tmp_path / "run")
    process = _start(tiny_npz, run)
    processes.append(process)
    _wait_for_checkpoint(run, process)
    process.send_signal(signum)
    sent = time.time()
    _, err = process.communicate(timeout=60)
    assert time.time() - sent < 15
    assert process.returncode != 0
    last = err.strip().splitlines()[-1]
    assert f"stopped by {name}" in last and "rerun the same command to resume" in last, last
    checkpoints = os.path.join(run, "checkpoints")
    latest = tf.train.latest_checkpoint(checkpoints)
    done = int(latest.rsplit("-", 1)[1])
    leftovers = [f for f in os.listdir(checkpoints) if "tmp" in f or "temp" in f]
    assert not leftovers
    model = rundir.load_model(run)  # the kept checkpoint restores completely
    assert model.num_clusters == 3
    again = _start(tiny_npz, run, epochs=done + 1)
    processes.append(again)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0 and f"after epoch {done}" in out + err, err[-3000:]


@pytest.mark.e2e  # a whole training run or export
def test_a_damaged_checkpoint_is_moved_aside_and_the_previous_one_used(tiny_npz, tmp_path):
    run = str(tmp_path / "run")
    config = Config(dataset=tiny_npz, model_dir=run, epochs=3, **TINY)
    training.train(config, log=lambda m: None)
    data_file = os.path.join(run, "checkpoints", "ckpt-3.data-00000-of-00001")
    with open(data_file, "r+b") as f:
        f.truncate(os.path.getsize(data_file) // 2)
    said = []
    training.train(config.replace(epochs=4), log=said.append)
    damaged = [line for line in said if line.startswith("checkpoint ")]
    assert len(damaged) == 1 and "ckpt-3" in damaged[0] and "\n" not in damaged[0]
    assert f"Resuming {run} after epoch 2" in said
    assert os.path.isfile(os.path.join(run, "checkpoints", "damaged", os.path.basename(data_file)))
    assert tf.train.latest_checkpoint(os.path.join(run, "checkpoints")).endswith("ckpt-4")
    # When no checkpoint restores, one line says so and what to do.
    for name in os.listdir(os.path.join(run, "checkpoints")):
        if name.endswith(".index"):
            open(os.path.join(run, "checkpoints", name), "wb").write(b"garbage")
    with pytest.raises(rundir.RunError, match="no checkpoint in .* restores.*--fresh") as error:
        training.train(config.replace(epochs=5), log=lambda m: None)
    assert "\n" not in str(error.value)


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.e2e  # a whole training run or export
def test_a_full_disk_while_checkpointing_stops_with_the_last_checkpoint_intact(
        tiny_npz, tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    original = tf.train.CheckpointManager.save
    calls = []

    def save(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # epoch 2: some bytes, then the disk is full
            prefix = os.path.join(self.directory, "ckpt-2")
            open(prefix + ".data-00000-of-00001", "w").write("partial")
            _full_disk()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tf.train.CheckpointManager, "save", save)
    with pytest.raises(training.TrainingError, match="could not write checkpoint .*ckpt-2 "
                       r"\(No space left on device\).*ckpt-1\) is intact") as error:
        training.train(Config(dataset=tiny_npz, model_dir=run, epochs=3, **TINY),
                       log=lambda m: None)
    assert "\n" not in str(error.value)
    files = os.listdir(os.path.join(run, "checkpoints"))
    assert not [f for f in files if f.startswith("ckpt-2")]
    assert tf.train.latest_checkpoint(os.path.join(run, "checkpoints")).endswith("ckpt-1")


def test_a_worker_whose_scratch_checkpoint_fails_leaves_the_chiefs_files(tmp_path,
                                                                         monkeypatch):
    model = tiny_cagem()
    model.compile(keras.optimizers.Adam(1e-3))
    chief, scratch = tmp_path / "checkpoints", tmp_path / ".worker-1-scratch"
    chief.mkdir()
    written = [chief / "ckpt-1.index", chief / "ckpt-1.data-00000-of-00001"]
    for path in written:  # what the chief wrote for this epoch
        path.write_text("the chief's")
    worker = callbacks.EpochCheckpoint(str(chief), model, scratch=str(scratch))
    worker.set_model(model)
    monkeypatch.setattr(tf.train.CheckpointManager, "save", _full_disk)
    worker.on_epoch_end(0, {"loss": 1.0})
    assert worker.write_error and str(scratch) in worker.write_error
    assert all(path.read_text() == "the chief's" for path in written)


@pytest.mark.e2e  # a whole training run or export
def test_a_full_disk_while_exporting_keeps_the_earlier_versions(tmp_path, monkeypatch):
    model = tiny_cagem(image_shape=(4,), num_clusters=2)
    export_dir = str(tmp_path / "export")
    first = serving.export(model, export_dir, iw_samples=(10,))

    def save(obj, path, *args, **kwargs):  # what serving.export calls to write
        os.makedirs(path)
        open(os.path.join(path, "saved_model.pb"), "w").write("partial")
        _full_disk()

    monkeypatch.setattr(tf.saved_model, "save", save)
    with pytest.raises(serving.ExportError, match=r"export .*2 \(No space left on device\); "
                       "the earlier versions are intact"):
        serving.export(model, export_dir, iw_samples=(10,))
    assert os.listdir(export_dir) == ["1"]
    assert os.path.isfile(os.path.join(first, "saved_model.pb"))


def test_a_full_disk_while_writing_the_config_or_an_evaluation_keeps_the_old_file(
        tmp_path, monkeypatch):
    path = str(tmp_path / "config.json")
    files.write_json(path, {"labels": 20})
    monkeypatch.setattr(json, "dump", _full_disk)
    with pytest.raises(files.FileError, match=r"could not write .*config.json \(No space left "
                       r"on device\); what was there before is unchanged"):
        files.write_json(path, {"labels": 50})
    assert json.load(open(path)) == {"labels": 20}
    monkeypatch.setattr(np, "save", _full_disk)
    with pytest.raises(files.FileError, match="could not write .*iw.npy"):
        from cagem_tf import evaluation
        evaluation._save_atomic(str(tmp_path / "iw.npy"), np.zeros(3))
    assert sorted(os.listdir(tmp_path)) == ["config.json"]
