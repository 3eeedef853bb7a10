"""A real TensorBoard on localhost reads a training run: scalars on one step axis that overlay
train and evaluation, the Projector's embeddings, and the HParams settings."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from cagem_tf import training
from cagem_tf.config import Config
from conftest import clustered_npz

# Real processes and servers: run with -m e2e (see pytest.ini).
pytestmark = pytest.mark.e2e

EPOCHS = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tb")
    data = clustered_npz(folder / "tiny.npz", 6, 300, 60)
    config = Config(dataset=data, model_dir=str(folder / "run"), labels=6, epochs=EPOCHS,
                    hidden_lower=[8], hidden_upper=[8], z1_dim=3, z2_dim=2, batch_size=50,
                    eval_every=1, eval_subset=40, eval_iw_samples=5, warmup_epochs=1,
                    export_every=-1, verbose=0)
    training.train(config, log=lambda m: None)
    return config.model_dir


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(run):
    """tensorboard --logdir RUN/logs on a free localhost port; stopped at the end."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", os.path.join(run, "logs"),
         "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            if process.poll() is not None:
                pytest.fail(f"TensorBoard did not start: {process.stderr.read()[-500:]}")
            try:
                runs = json.load(urllib.request.urlopen(f"{url}/data/runs", timeout=5))
                if {"train", "eval"} <= set(runs):
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.time() > deadline:
                pytest.fail("TensorBoard did not answer with the train and eval runs within 90 s")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def get(url, path, body=None):
    request = urllib.request.Request(url + path, data=None if body is None else
                                     json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              "X-TensorBoard-Feature-Flags": "{}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read()


def steps(url, run, tag):
    return [point[1] for point in json.loads(get(
        url, f"/data/plugin/scalars/scalars?run={run}&tag={tag}"))]


def test_train_and_evaluation_share_tags_and_the_epoch_step_axis(server):
    tags = json.loads(get(server, "/data/plugin/scalars/tags"))
    shared = {"likelihood/elbo", "likelihood/log_px", "kl/kl_z1", "kl/kl_z2", "kl/kl_y",
              "classifier/h_p", "classifier/h_q", "classifier/error_p", "classifier/error_q"}
    assert shared <= set(tags["train"]) and shared <= set(tags["eval"])
    for tag in shared:
        assert steps(server, "train", tag) == list(range(1, EPOCHS + 1)), tag
        assert steps(server, "eval", tag) == list(range(1, EPOCHS + 1)), tag
    # Settings that are not evaluated are logged once, in the training run.
    once = {"schedule/learning_rate", "schedule/temperature", "schedule/alpha",
            "time/hours_left"}
    assert once <= set(tags["train"]) and not once & set(tags["eval"])
    assert {"likelihood/iw_bound", "clusters/clusters_used", "clusters/mutual_information",
            "clusters/nmi"} <= set(tags["eval"])
    # The groups the Time Series dashboard shows: the tags' sections.
    sections = {tag.split("/")[0] for run in ("train", "eval") for tag in tags[run]}
    assert {"likelihood", "kl", "clusters", "classifier", "schedule"} <= sections
    assert "other" not in sections


def test_projector_shows_the_latent_means_with_label_cluster_and_epoch(server, run):
    deadline = time.time() + 60
    while "eval" not in json.loads(get(server, "/data/plugin/projector/runs")):
        assert time.time() < deadline, "the Projector lists no run"
        time.sleep(1)
    info = json.loads(get(server, "/data/plugin/projector/info?run=eval"))
    embeddings = {e["tensorName"]: e for e in info["embeddings"]}
    assert embeddings["z2_means"]["tensorShape"] == [40, 2]
    assert embeddings["z1_means"]["tensorShape"] == [40, 3]
    metadata = get(server, "/data/plugin/projector/metadata?run=eval&name=z2_means").decode()
    rows = metadata.splitlines()
    assert rows[0].split("\t") == ["label", "cluster", "epoch"] and len(rows) == 41
    assert {r.split("\t")[2] for r in rows[1:]} == {str(EPOCHS)}
    values = np.frombuffer(get(server, "/data/plugin/projector/tensor?run=eval&name=z2_means"),
                           np.float32).reshape(40, 2)
    expected = np.loadtxt(os.path.join(run, "logs", "eval", "z2_means.tsv"), np.float32)
    np.testing.assert_allclose(values, expected, rtol=1e-5)


def test_hparams_dashboard_lists_the_run_settings(server):
    experiment = json.loads(get(server, "/data/plugin/hparams/experiment",
                                {"experimentName": ""}))
    names = {h["name"] for h in experiment["hparamInfos"]}
    assert {"labels", "hidden_lower", "beta", "z2_dim", "seed"} <= names
    assert "epochs" not in names  # it may change on resume: not a setting of the model
