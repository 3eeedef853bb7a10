"""Evaluation: active units, KL per unit, resumable IW bounds, figures, evaluate CLI, driver."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from cagem_tf import evaluation, figures, objective, report, rundir, training
from cagem_tf.config import Config
from conftest import clustered_npz, tiny_cagem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _x(n, d=5, seed=0):
    return np.random.default_rng(seed).integers(0, 2, (n, d)).astype(np.float32)


def test_active_units_criterion():
    rng = np.random.default_rng(0)
    means = np.concatenate([rng.normal(0, 1, (500, 3)), rng.normal(0, 0.03, (500, 4))], 1)
    count, variance = evaluation.active_units(means)
    assert count == 3 and variance.shape == (7,)


def test_active_units_of_an_encoder_with_known_dimensions():
    """q(z1|x) whose mean head ignores its input for units 2 and 3: exactly 2 units active."""
    model = tiny_cagem(z1_dim=4)
    loc = model.q_z1.heads[0]
    kernel = loc.kernel.numpy()
    kernel[:, 2:] = 0.0
    kernel[:, :2] *= 5.0
    loc.kernel.assign(kernel)
    z1_means, _ = evaluation.means(model, _x(400))
    assert evaluation.active_units(z1_means)[0] == 2


def test_kl_per_unit_sums_to_the_elbo_terms():
    model = tiny_cagem(num_clusters=3, z1_dim=3, z2_dim=2)
    x, seed = _x(50), tf.constant([3, 1])
    kl_z1, kl_z2 = evaluation.kl_per_unit(model, x, seed)
    parts = objective.elbo(model.latent_terms(x, 1, seed))
    assert kl_z1.shape == (3,) and kl_z2.shape == (2,)
    assert kl_z1.sum() == pytest.approx(float(tf.reduce_mean(parts["kl_z1"])), rel=1e-4)
    assert kl_z2.sum() == pytest.approx(float(tf.reduce_mean(parts["kl_z2"])), rel=1e-4)
    assert np.all(kl_z2 > 0)


def test_interrupted_evaluation_resumes_to_the_same_result(tmp_path):
    model = tiny_cagem()
    x = _x(50)
    whole = evaluation.iw_bounds(model, x, 20, str(tmp_path / "a"), batch_size=10,
                                 progress=False)
    assert not np.isnan(whole).any()
    # An interrupted run: the first three batches saved (marked by sentinels), the rest not.
    partial = np.full(50, np.nan, np.float32)
    partial[:30] = 123.0
    os.makedirs(tmp_path / "b")
    name = os.path.basename([f for f in os.listdir(tmp_path / "a") if f.endswith(".npy")][0])
    np.save(tmp_path / "b" / name, partial)
    resumed = evaluation.iw_bounds(model, x, 20, str(tmp_path / "b"), batch_size=10,
                                   progress=False)
    np.testing.assert_array_equal(resumed[:30], 123.0)   # finished batches are not redone
    np.testing.assert_array_equal(resumed[30:], whole[30:])
    again = evaluation.iw_bounds(model, x, 20, str(tmp_path / "c"), batch_size=10,
                                 progress=False)
    np.testing.assert_array_equal(again, whole)


def test_a_resumed_evaluation_with_other_batches_or_chunks_does_not_reuse_the_saved_bounds(
        tmp_path):
    model = tiny_cagem()
    x = _x(30)
    directory = str(tmp_path / "bounds")
    first = evaluation.iw_bounds(model, x, 20, directory, batch_size=10, progress=False)
    for changes in ({"batch_size": 15}, {"batch_size": 10, "chunk_size": 7}):
        again = evaluation.iw_bounds(model, x, 20, directory, progress=False, **changes)
        fresh = evaluation.iw_bounds(model, x, 20, str(tmp_path / str(changes)),
                                     progress=False, **changes)
        np.testing.assert_array_equal(again, fresh)
        assert not np.array_equal(again, first), changes  # other draws: not the saved values
    # A damaged file of saved bounds is started over, not a crash.
    name = evaluation.iw_bounds_file(directory, "exact", 20, 0, 30, 10, None)
    with open(name, "wb") as f:
        f.write(b"not a numpy file")
    np.testing.assert_array_equal(
        evaluation.iw_bounds(model, x, 20, directory, batch_size=10, progress=False), first)


def _png_shape(path):
    return tuple(tf.io.decode_png(tf.io.read_file(str(path))).shape)


def test_figures_have_the_expected_sizes(tmp_path):
    model = tiny_cagem(image_shape=(6, 6, 1), num_clusters=3, z1_dim=3, z2_dim=2)
    x = _x(30, 36).reshape(30, 6, 6, 1)
    y = np.arange(30) % 3
    latent = evaluation.latent_summary(model, x)
    clusters = evaluation.cluster_report(model, x, y, 3)
    run = rundir.RunDir(str(tmp_path / "run"))
    os.makedirs(run.evaluation)
    report.write_figures(model, x, y, latent, clusters, run, 0)
    tb = run.logs("evaluation")
    tmp_path = tmp_path / "run" / "evaluation"
    assert _png_shape(tmp_path / "samples.png") == (60, 60, 1)
    assert _png_shape(tmp_path / "class_conditional.png") == (18, 60, 1)
    assert _png_shape(tmp_path / "reconstructions.png") == (12, 60, 1)
    assert _png_shape(tmp_path / "z2_mesh.png") == (60, 60, 1)
    assert _png_shape(tmp_path / "z2_mesh_class_conditional.png") == (60, 180, 1)
    for name in ("pca_z1.png", "pca_z2.png"):
        height, width, _ = _png_shape(tmp_path / name)
        assert height > 200 and width > 200
    figures.likelihood_vs_labels([(0, {"1": -90.0, "10": -88.0}), (100, {"1": -87.0,
                                                                           "10": -86.0})],
                                 str(tmp_path / "ll.png"))
    assert _png_shape(tmp_path / "ll.png")[0] > 200
    assert os.listdir(tb)
    for name in ("occupancy.png", "cluster_by_label.png"):
        height, width, channels = _png_shape(tmp_path / name)
        assert height > 100 and width > 100 and channels == 3


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    return clustered_npz(tmp_path_factory.mktemp("data") / "tiny.npz", 6, 300, 100)


def _tiny_flags(labels):
    return [f"--labels={labels}", "--hidden_lower=8", "--hidden_upper=8", "--z1_dim=2",
            "--z2_dim=2", "--batch_size=100", "--epochs=1", "--eval_every=0", "--verbose=0",
            "--export_every=-1"]


@pytest.mark.e2e  # a whole training run or export
def test_evaluate_writes_results(tiny_npz, tmp_path):
    run = str(tmp_path / "run")
    config = {"dataset": tiny_npz, "model_dir": run, "epochs": 1,
              "labels": 6, "hidden_lower": [8, 8], "hidden_upper": [8, 8], "z1_dim": 2,
              "z2_dim": 2, "eval_every": 0, "verbose": 0, "export_every": -1}
    training.train(Config(**config), log=lambda m: None)
    results = report.evaluate(run, iw_samples=(1, 10), subset=40, batch_size=20, progress=False,
                       log=lambda m: None)
    saved = json.load(open(os.path.join(run, "evaluation", "results.json")))
    assert saved["images"] == 40 and set(saved["bounds"]) == {"1", "10"}
    assert saved["bounds"]["10"]["mean"] >= saved["bounds"]["1"]["mean"] - 3 * (
        saved["bounds"]["1"]["stderr"] + saved["bounds"]["10"]["stderr"])
    assert len(saved["kl_z2_per_unit"]) == 2
    # The errors are those of the classifiers on these images, recomputed here.
    _, x, y, _ = rundir.evaluation_images(run, 40)
    model = rundir.load_model(run)
    p_y, q_y = evaluation.cluster_probs(model, x, 0)
    assert saved["error_p"] == pytest.approx(np.mean(np.argmax(p_y, -1) != y))
    assert saved["error_q"] == pytest.approx(np.mean(np.argmax(q_y, -1) != y))
    posterior = evaluation.posterior_probs(model, x, seed=0)
    assert saved["error_posterior"] == pytest.approx(np.mean(np.argmax(posterior, -1) != y))
    assert results["bounds"] == saved["bounds"]
    assert "F_10" in open(os.path.join(run, "evaluation", "results.md")).read()


@pytest.mark.e2e
def test_driver_on_two_tiny_configurations(tiny_npz, tmp_path):
    files = []
    for name, labels in (("semi", 6), ("unsup", 0)):
        path = tmp_path / f"{name}.flags"
        path.write_text("\n".join(_tiny_flags(labels)) + "\n")
        files.append(str(path))
    out = tmp_path / "out"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")

    def compare(*args):
        return subprocess.run([sys.executable, "experiments/compare.py",
                               f"--flagfiles={','.join(files)}", f"--out={out}",
                               "--eval_iw_samples=1,5", "--eval_subset=30", *args, "--",
                               f"--dataset={tiny_npz}"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    refused = compare("--baseline=vae")  # not a run: refused before anything is written
    assert refused.returncode != 0 and not out.exists()
    assert refused.stderr.strip().splitlines()[-1].startswith("error: --baseline vae: not one")
    result = compare("--baseline=unsup")
    assert result.returncode == 0, result.stderr[-3000:]
    table, paired = open(out / "comparison.md").read().split("\n\n")
    rows = table.splitlines()
    assert rows[0].startswith("| run | labels | K | F_1 | F_5 |")
    assert [r.split("|")[1].strip() for r in rows[2:]] == ["semi", "unsup"]
    assert os.path.isfile(out / "likelihood_vs_labels.png")
    paired = paired.splitlines()
    assert paired[0] == "| run | F_5 - unsup (nats, paired per image) |"
    assert [r.split("|")[1].strip() for r in paired[2:]] == ["semi", "unsup"]
    assert paired[3] == "| unsup | +0.00 ± 0.00 |"  # a run against itself


@pytest.mark.e2e
def test_estimators_cli_reports_bad_input_in_one_line(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    for args, expected in [
        ([f"--model_dir={tmp_path}", "--samples=exact:5000,magic:10"], "--samples 'magic:10'"),
        ([f"--model_dir={tmp_path}"], "no model.json"),
        ([f"--model_dir={tmp_path}", "--repeats=1"], "--repeats >= 2"),
    ]:
        result = subprocess.run([sys.executable, "experiments/estimators.py", *args], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode != 0
        assert [line for line in result.stderr.splitlines() if line.startswith("error:")
                and expected in line], result.stderr[-2000:]


@pytest.mark.e2e  # a whole training run or export
def test_a_later_checkpoint_is_scored_anew_not_from_the_earlier_ones_bounds(tiny_npz, tmp_path):
    run = str(tmp_path / "run")
    config = {"dataset": tiny_npz, "model_dir": run, "epochs": 1, "labels": 6,
              "hidden_lower": [8], "hidden_upper": [8], "z1_dim": 2, "z2_dim": 2,
              "eval_every": 0, "verbose": 0, "export_every": -1}
    quiet = dict(iw_samples=(10,), subset=40, batch_size=20, progress=False, figures_too=False,
                 log=lambda m: None)
    training.train(Config(**config), log=lambda m: None)
    first = report.per_image_bounds(run, 10, report.evaluate(run, **quiet))
    training.train(Config(**{**config, "epochs": 3}), log=lambda m: None)  # resumed: 2 more
    later = report.per_image_bounds(run, 10, report.evaluate(run, **quiet))
    assert not np.allclose(first, later)
    _, x, _, _ = rundir.evaluation_images(run, 40, log=lambda m: None)
    fresh = evaluation.iw_bounds(rundir.load_model(run), x, 10, str(tmp_path / "fresh"),
                                 batch_size=20, progress=False)
    np.testing.assert_allclose(later, fresh, rtol=1e-5)


@pytest.mark.e2e  # a whole training run or export
def test_a_vae_run_trains_and_evaluates_with_cluster_use_but_no_classifier(tiny_npz, tmp_path):
    run = str(tmp_path / "vae")
    config = Config(dataset=tiny_npz, model_dir=run, epochs=1, labels=0, clusters=1,
                    hidden_lower=[8], hidden_upper=[8], z1_dim=2, z2_dim=2, eval_every=1,
                    eval_subset=40, eval_iw_samples=5, verbose=0, export_every=-1)
    training.train(config, log=lambda m: None)  # with a periodic evaluation
    results = report.evaluate(run, iw_samples=(5,), subset=40, batch_size=20, progress=False,
                              figures_too=False, log=lambda m: None)
    assert results["clusters"] == 1 and results["cluster_use"]["clusters_used"] == 1
    assert results["cluster_use"]["occupancy"] == [40]
    assert "error_p" not in results and "h_p" not in results["cluster_use"]


@pytest.mark.e2e  # a whole training run or export
def test_a_labelled_run_with_seeded_pseudo_labels_and_the_beta_schedule_trains_and_reports_errors(
        tiny_npz, tmp_path):
    run = str(tmp_path / "semi")
    lines = []
    config = Config(dataset=tiny_npz, model_dir=run, epochs=2, labels=6, pseudo_labels=1.0,
                    departure_epochs=1, beta=0.01, beta_start=0.1, beta_epochs=1,
                    hidden_lower=[8], hidden_upper=[8], z1_dim=2, z2_dim=2, eval_every=0,
                    verbose=0, export_every=-1)
    logs = training.train(config, log=lines.append)
    assert any("k-means seeded by the 6 labelled images" in line for line in lines)
    # After the schedule: the paper's alpha with beta 0.01 (300 images, 6 labelled).
    assert logs["alpha"] == pytest.approx(0.01 * (300 + 6) / 6, rel=1e-6)
    results = report.evaluate(run, iw_samples=(5,), subset=40, batch_size=20, progress=False,
                              figures_too=False, log=lambda m: None)
    for key in ("error_p", "error_q", "error_posterior"):
        assert key in results, key
    assert "error p(y|x), the model's posterior (IS-100)" in open(
        os.path.join(run, "evaluation", "results.md")).read()


def _scored_run(path, per_image, data_dim=None):
    os.makedirs(os.path.join(path, "evaluation"))
    np.save(os.path.join(path, "evaluation", "iw.npy"), np.asarray(per_image, np.float32))
    bound = {"mean": float(np.mean(per_image)), "stderr": 0.0, "per_image": "evaluation/iw.npy"}
    results = {"bounds": {"100": bound}, "iw_estimator": "exact", "images": len(per_image)}
    if data_dim:
        results["data_dim"] = data_dim
        bound["bits_per_dim"] = float(objective.bits_per_dim(bound["mean"], data_dim))
    with open(os.path.join(path, "evaluation", "results.json"), "w") as f:
        json.dump(results, f)
    return str(path)


def test_the_paired_table_gives_8bit_runs_differences_in_bits_per_dimension_too(tmp_path):
    D = 784
    base = _scored_run(tmp_path / "vae", [-2000.0, -2100.0], D)
    run = _scored_run(tmp_path / "cagem", [-1990.0, -2080.0], D)   # +10 and +20 nats
    table = report.paired_table({"vae": base, "cagem": run}, "vae", 100)
    bits = -15.0 / (D * np.log(2))                                  # mean +15 nats, fewer bits
    assert "| cagem | +15.00 ± 3.54 |" in table and f"{bits:+.4f} ± " in table
    grey = report.paired_table({"a": _scored_run(tmp_path / "a", [-90.0]),
                                "b": _scored_run(tmp_path / "b", [-89.0])}, "a", 100)
    assert "bits" not in grey and "| b | +1.00 ± 0.00 |" in grey
