"""--strategy multi_worker with two real worker processes on localhost (TF_CONFIG): one set of
run files written by the chief, identical weights on both workers, the loss of a single process
with the same global batch, and a job that stops when a worker dies and resumes on a rerun."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import clustered_npz

# Real processes and servers: run with -m e2e (see pytest.ini).
pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = r"""
import json, os, sys
import numpy as np
from cagem_tf import callbacks, training
from cagem_tf.config import Config
config = Config(**json.loads(sys.argv[1]))
dump = sys.argv[2]
original = callbacks.EpochCheckpoint.on_train_end

def on_train_end(self, logs=None):  # each worker's trained weights, for the test to compare
    np.savez(dump, *[np.asarray(w.numpy()) for w in self.model.weights])

callbacks.EpochCheckpoint.on_train_end = on_train_end
logs = training.train(config)
print("RESULT" + json.dumps({k: float(np.ravel(v)[0]) for k, v in logs.items()}))
"""


def _ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    return clustered_npz(tmp_path_factory.mktemp("data") / "tiny.npz", 6, 400, 40)


def _settings(tiny_npz, run, **changes):
    return {"dataset": tiny_npz, "model_dir": run, "epochs": 1, "labels": 6,
            "hidden_lower": [8], "hidden_upper": [8], "z1_dim": 2, "z2_dim": 2,
            "batch_size": 100, "labelled_batch_size": 6, "eval_every": 0, "verbose": 0,
            "export_every": 0, "export_iw_samples": [10], "strategy": "multi_worker",
            **changes}


def _start(settings, dump, cluster=None, index=0):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    if cluster:
        env["TF_CONFIG"] = json.dumps({"cluster": {"worker": cluster},
                                       "task": {"type": "worker", "index": index}})
    return subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(settings), str(dump)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _result(out):
    lines = [l for l in out.splitlines() if l.startswith("RESULT")]
    return json.loads(lines[0][len("RESULT"):]) if lines else None


def _cluster(settings, tmp_path, processes):
    cluster = [f"127.0.0.1:{p}" for p in _ports(2)]
    workers = [_start(settings, tmp_path / f"w{i}.npz", cluster, i) for i in range(2)]
    processes.extend(workers)
    return workers


def test_two_workers_train_as_one_with_one_set_of_run_files(tiny_npz, tmp_path, processes):
    run = str(tmp_path / "run")
    workers = _cluster(_settings(tiny_npz, run), tmp_path, processes)
    outputs = [w.communicate(timeout=240) for w in workers]
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-3000:]
    logs = [_result(out) for out, _ in outputs]
    # One set of run files, by the chief; the other worker's checkpoint scratch is gone.
    assert sorted(os.listdir(run)) == [".lock", "checkpoints", "config.json", "export",
                                       "labelled_indices.json", "logs", "model.json"]
    assert sorted(os.listdir(os.path.join(run, "export"))) == ["1"]
    assert sorted(f for f in os.listdir(os.path.join(run, "checkpoints"))) == [
        "checkpoint", "ckpt-1.data-00000-of-00001", "ckpt-1.index"]
    events = [f for base, _, files in os.walk(os.path.join(run, "logs")) for f in files]
    assert len(events) == 3  # train, eval (settings per epoch) and the HParams summary
    first, second = (np.load(tmp_path / f"w{i}.npz") for i in range(2))
    for key in first.files:
        np.testing.assert_array_equal(first[key], second[key])
    # A single process with the same global batch: the same objective (other noise draws).
    single = _start(_settings(tiny_npz, str(tmp_path / "single"), strategy="default"),
                    tmp_path / "single.npz")
    processes.append(single)
    out, err = single.communicate(timeout=240)
    assert single.returncode == 0, err[-3000:]
    alone = _result(out)
    assert logs[0]["loss"] == logs[1]["loss"]
    assert logs[0]["alpha"] == pytest.approx(alone["alpha"])  # N_u, N_l of the global batch
    # Four steps from the same initial weights (the seed), with other noise draws and batch
    # normalization over the global batch: the objective and the metrics agree (a loss or a
    # metric counted once per worker would double it).
    for name in ("elbo", "log_px", "kl_z1"):  # 400 images an epoch: the noise averages out
        assert logs[0][name] == pytest.approx(alone[name], rel=0.03), name
    for name in ("loss", "h_q"):  # the cross-entropy on 6 labelled images a step: noisier
        assert logs[0][name] == pytest.approx(alone[name], rel=0.25), name


def test_a_killed_worker_stops_the_job_and_a_rerun_resumes(tiny_npz, tmp_path, processes):
    run = str(tmp_path / "run")
    workers = _cluster(_settings(tiny_npz, run, epochs=100, export_every=-1), tmp_path,
                       processes)
    deadline = time.time() + 180
    while not tf.train.latest_checkpoint(os.path.join(run, "checkpoints")):
        assert all(w.poll() is None for w in workers), workers[0].stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.5)
    workers[1].send_signal(signal.SIGKILL)
    # No collective timeout (the default): the coordination service misses the dead worker's
    # heartbeats and aborts the chief's collectives.
    _, err = workers[0].communicate(timeout=120)
    assert workers[0].returncode != 0
    # (The worker script calls training.train; the programs print the TrainingError's line.)
    assert "TrainingError: worker /job:worker/replica:0/task:1 stopped; the job stopped" in err, \
        err[-3000:]
    done = int(tf.train.latest_checkpoint(os.path.join(run, "checkpoints")).rsplit("-", 1)[1])
    workers = _cluster(_settings(tiny_npz, run, epochs=done + 1, export_every=-1), tmp_path,
                       processes)
    outputs = [w.communicate(timeout=240) for w in workers]
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-3000:]
    assert f"Resuming {run} after epoch {done}" in outputs[0][0] + outputs[0][1]
    assert tf.train.latest_checkpoint(os.path.join(run, "checkpoints")).endswith(
        f"ckpt-{done + 1}")


def _threads(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("Threads:")).split()[1])


def test_workers_with_the_defaults_train_past_thirty_seconds_with_a_bounded_thread_count(
        tiny_npz, tmp_path, processes):
    # With a collective timeout TensorFlow kept a thread waiting per collective: ~1,400 more
    # a second until the workers aborted (after ~25 s of steps). Here the workers must still
    # be training (a new epoch's checkpoint) more than 30 s after they started, and the bound
    # of 400 threads is crossed within a second of such steps.
    run = str(tmp_path / "run")
    settings = _settings(tiny_npz, run, epochs=10000, batch_size=40,  # 10 steps an epoch
                         export_every=-1)
    settings.pop("collective_timeout", None)
    started = time.time()
    workers = _cluster(settings, tmp_path, processes)
    checkpoints = os.path.join(run, "checkpoints")
    counts, epoch_at_30_s = [], None
    while True:
        dead = [w for w in workers if w.poll() is not None]
        assert not dead, dead[0].stderr.read()[-3000:]  # a dead worker's pipe reads to its end
        counts.append(max(_threads(w.pid) for w in workers))
        latest = tf.train.latest_checkpoint(checkpoints)
        epoch = int(latest.rsplit("-", 1)[1]) if latest else 0
        if epoch_at_30_s is None and time.time() - started > 30:
            epoch_at_30_s = epoch
        if epoch_at_30_s is not None and epoch > epoch_at_30_s:
            break  # an epoch finished after 30 s
        assert time.time() - started < 240, (epoch, counts)
        time.sleep(1)
    assert max(counts) < 400, counts
