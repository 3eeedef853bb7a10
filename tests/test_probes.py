"""Probes of the latents' class information and p(y|z2) refitted alone (the cascade's diagnosis)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from cagem_tf import evaluation, probes, rundir, training
from cagem_tf.config import Config
from conftest import clustered_npz, tiny_cagem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_probe_reads_the_class_from_separable_codes_and_nothing_from_labels_drawn_apart():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 3000)
    codes = 4.0 * np.eye(3, 4)[labels] + rng.normal(size=(3000, 4))  # means 5.7 sd apart
    train, test = slice(0, 2000), slice(2000, None)
    separable = probes.probe_error(codes[train], labels[train], codes[test], labels[test], 3,
                                     steps=500)
    assert separable < 0.05
    unrelated = rng.integers(0, 3, 3000)
    chance = probes.probe_error(codes[train], unrelated[train], codes[test], unrelated[test], 3,
                                hidden=16, steps=500)
    assert chance > 0.55  # 2/3 by chance


def test_mean_codes_are_q_s_means_at_its_most_likely_cluster():
    model = tiny_cagem(num_clusters=3, z2_dim=2)
    x = (np.random.default_rng(1).random((7, 5)) < 0.5).astype(np.float32)
    got = probes.codes(model, x, "mean", batch_size=4)                 # two batches
    z1, _ = model.q_z1([x])
    c = np.argmax(model.q_y([z1, x]).numpy(), -1)
    z2_all, _ = model.q_z2(model.q_z2_inputs(model.clusters(1), z1, x))   # [K,B,d2]
    z2 = z2_all.numpy()[c, np.arange(7)]
    np.testing.assert_allclose(got["z1"], z1.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["c"], c)
    np.testing.assert_allclose(got["z2"], z2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["p_y"], tf.nn.softmax(model.p_y([z2])).numpy(),
                               rtol=1e-5, atol=1e-6)


def test_draw_codes_repeat_with_their_seed_and_follow_q_s_clusters():
    model = tiny_cagem(num_clusters=2)
    x = np.ones((400, 5), np.float32)  # one image: its q(c|z1,x) varies with z1 only
    first, again = probes.codes(model, x, "draw", seed=4), probes.codes(model, x, "draw", seed=4)
    for key in ("z1", "z2", "c"):
        np.testing.assert_array_equal(first[key], again[key])
    other = probes.codes(model, x, "draw", seed=5)
    assert not np.allclose(first["z2"], other["z2"])
    assert first["z2"].shape == (400, 1) and first["p_y"].shape == (400, 2)
    # The clusters drawn follow q(c|z1,x) at the drawn z1: their share is its mean.
    q_c = tf.nn.softmax(model.q_y([tf.constant(first["z1"]), x])).numpy()[:, 1]
    assert abs(np.mean(first["c"]) - np.mean(q_c)) < 4 * np.sqrt(0.25 / 400)


def test_an_unknown_kind_of_code_is_refused():
    with pytest.raises(ValueError, match="kind 'median'"):
        probes.codes(tiny_cagem(), np.ones((2, 5), np.float32), "median")


def test_refitting_p_y_moves_p_y_alone_and_raises_the_elbo():
    model = tiny_cagem()
    images = (np.random.default_rng(2).random((200, 5)) < 0.3).astype(np.uint8) * 255
    x = (images / 255).astype(np.float32)
    p_y = {v.path for v in model.p_y.trainable_variables}
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    elbo = lambda: float(tf.reduce_mean(model.elbo(x, 200, seed=[9, 9])["elbo"]))
    start = elbo()
    probes.refit_p_y(model, images, steps=150, learning_rate=1e-2)
    for v in model.trainable_variables:
        if v.path not in p_y:
            np.testing.assert_array_equal(v.numpy(), before[v.path], err_msg=v.path)
        elif "kernel" in v.path:
            assert not np.array_equal(v.numpy(), before[v.path]), v.path
    assert elbo() > start


@pytest.mark.e2e  # a whole (tiny) training run
def test_the_cascade_study_reports_the_run_s_own_errors_and_refuses_a_run_without_classes(
        tmp_path):
    npz = clustered_npz(tmp_path / "tiny.npz", 6, 300, 100)
    runs = {}
    for name, labels in (("labelled", 6), ("unlabelled", 0)):
        runs[name] = str(tmp_path / name)
        settings = {"dataset": npz, "model_dir": runs[name], "epochs": 1, "labels": labels,
                    "hidden_lower": [8], "hidden_upper": [8], "z1_dim": 2,
                    "z2_dim": 2, "eval_every": 0, "verbose": 0, "export_every": -1}
        training.train(Config(**settings), log=lambda m: None)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")

    def study(run, *args):
        return subprocess.run([sys.executable, "experiments/cascade.py", f"--model_dir={run}",
                               "--train_images=200", "--test_images=50", "--hidden=8",
                               "--probe_steps=100", *args],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    result = study(runs["labelled"], "--refit_steps=5")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = dict(line.strip("| ").split(" | ") for line in result.stdout.splitlines()
                if line.startswith("| ") and line.endswith("% |"))
    assert len(rows) == 10
    model = rundir.load_model(runs["labelled"])
    _, x, y, _ = rundir.evaluation_images(runs["labelled"], 50)
    p_y, q_y = evaluation.cluster_probs(model, x, 0)
    assert rows["q(y\\|x) (10 draws of z1)"] == f"{np.mean(np.argmax(q_y, -1) != y):.1%}"
    cascade = f"{np.mean(np.argmax(p_y, -1) != y):.1%}"
    assert rows["the cascade p(y\\|x) (10 draws of z1, a z2 per class)"] == cascade
    assert f"refitted alone on the ELBO, 5 steps: cascade {cascade} -> " in result.stdout
    for run, args, expected in ((runs["unlabelled"], [], "trained without labels"),
                                (str(tmp_path / "none"), [], "no model.json"),
                                (runs["labelled"], ["--draws=0"], "--draws")):
        refused = study(run, *args)
        assert refused.returncode != 0
        assert refused.stderr.strip().splitlines()[-1].startswith("error:") \
            and expected in refused.stderr.strip().splitlines()[-1], refused.stderr[-2000:]
