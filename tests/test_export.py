"""SavedModel export: signatures, TensorFlow-only loading, input checks, versions, tools."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from cagem_tf import files, rundir, serving
from conftest import BATCH_ROUNDING, tiny_cagem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (6, 6, 1)
K = 3


@pytest.fixture(scope="module")
def model():
    return tiny_cagem(image_shape=SHAPE, num_clusters=K, z1_dim=3, z2_dim=2)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    export_dir = str(tmp_path_factory.mktemp("export"))
    return export_dir, serving.export(model, export_dir, iw_samples=(200, 1000))


SIGNATURES = ["classify", "classify_posterior", "sample", "sample_class", "log_likelihood_200",
              "log_likelihood_1000", "log_likelihood_sampled_200",
              "log_likelihood_sampled_1000", "encode", "reconstruct", "serving_default"]


def _images(n=5, seed=0):
    return np.random.default_rng(seed).random((n, *SHAPE)).astype(np.float32)


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")


CONSUMER = r"""
import json, sys
import numpy as np, tensorflow as tf
m = tf.saved_model.load(sys.argv[1])
x = tf.constant(np.load(sys.argv[2]))
out = {"signatures": sorted(m.signatures)}
for name, kwargs in [
        ("classify", dict(x=x)), ("classify_posterior", dict(x=x)), ("encode", dict(x=x)),
        ("reconstruct", dict(x=x)),
        ("log_likelihood_200", dict(x=x)), ("log_likelihood_sampled_1000", dict(x=x)),
        ("sample", dict(seed=tf.constant([7, 8, 7, 9]))),
        ("sample_class", dict(y=tf.constant([0, 2, 1]), seed=tf.constant([7, 7, 7])))]:
    out[name] = {k: v.numpy().tolist() for k, v in m.signatures[name](**kwargs).items()}
out["specs"] = {name: {k: v.shape.as_list() for k, v in
                       m.signatures[name].structured_input_signature[1].items()}
                for name in m.signatures}
out["again"] = m.signatures["sample"](seed=tf.constant([9, 7]))["probs"].numpy().tolist()
out["fresh"] = [m.signatures["sample"](seed=tf.constant([-1, -1]))["probs"].numpy().tolist()
                for _ in range(2)]
out["modules"] = sorted(k for k in sys.modules if k.split(".")[0] in
                        ("cagem_tf", "tensorflow_probability", "export"))
print("RESULT" + json.dumps(out))
"""


@pytest.mark.e2e
def test_loads_with_tensorflow_alone_and_matches_the_model(model, exported, tmp_path):
    _, path = exported
    x = _images()
    np.save(tmp_path / "x.npy", x)
    result = subprocess.run([sys.executable, "-c", CONSUMER, path, str(tmp_path / "x.npy")],
                            env=_env(), capture_output=True, text=True, timeout=300, cwd="/")
    lines = [l for l in result.stdout.splitlines() if l.startswith("RESULT")]
    assert lines, result.stderr[-3000:]
    out = json.loads(lines[0][len("RESULT"):])
    assert out["modules"] == []
    assert out["signatures"] == sorted(SIGNATURES)
    # Every input has a leading batch dimension; x is [N,H,W,1].
    for name, inputs in out["specs"].items():
        for shape in inputs.values():
            assert shape[0] is None, (name, inputs)
    assert out["specs"]["classify"] == {"x": [None, *SHAPE]}
    assert out["specs"]["sample_class"] == {"y": [None], "seed": [None]}
    seed = tf.constant(serving.CLASSIFIER_SEED)
    for i in range(len(x)):  # each row is answered as if alone
        p_y, q_y = model.classify(x[i:i + 1], seed=seed, row_independent=True)
        np.testing.assert_allclose(out["classify"]["p_y"][i], p_y[0], atol=1e-5)
        np.testing.assert_allclose(out["classify"]["q_y"][i], q_y[0], atol=1e-5)
        for name, estimator, samples in (("log_likelihood_200", "exact", 200),
                                         ("log_likelihood_sampled_1000", "sampled", 1000)):
            alone = model.iw_bound(x[i:i + 1], samples, seed=seed, estimator=estimator,
                                   row_independent=True)
            np.testing.assert_allclose(out[name]["log_likelihood"][i], alone[0], rtol=1e-4)
    assert out["classify"]["label"] == np.argmax(out["classify"]["q_y"], -1).tolist()
    # classify_posterior is the model's own p(y|x), each row with the draws it gets alone.
    posterior = np.array(out["classify_posterior"]["p_y"])
    alone = np.concatenate([np.exp(model.posterior_log_probs(
        x[i:i + 1], serving.POSTERIOR_SAMPLES, seed=seed, row_independent=True))
        for i in range(len(x))])
    np.testing.assert_allclose(posterior, alone, atol=1e-5)
    np.testing.assert_allclose(posterior.sum(-1), 1.0, atol=1e-5)
    assert out["classify_posterior"]["label"] == np.argmax(posterior, -1).tolist()
    z1, z2 = model.encode(x)
    np.testing.assert_allclose(out["encode"]["z1"], z1, atol=1e-5)
    np.testing.assert_allclose(out["encode"]["z2"], z2, atol=1e-5)
    np.testing.assert_allclose(out["reconstruct"]["probs"], model.reconstruct(x), atol=1e-5)
    assert np.array(out["sample"]["probs"]).shape == (4, *SHAPE)
    assert out["sample"]["probs"][0] == out["sample"]["probs"][2]  # seed 7 twice
    assert set(np.unique(out["sample"]["images"])) <= {0.0, 1.0}
    assert all(0 <= y < K for y in out["sample"]["y"])
    assert np.array(out["sample_class"]["probs"]).shape == (3, *SHAPE)
    # Seeds 9 and 7 in a batch of 2 give the samples of a batch of 4 (seeds 7, 8, 7, 9).
    again, first = np.array(out["again"]), np.array(out["sample"]["probs"])
    np.testing.assert_allclose(again[1], first[0], **BATCH_ROUNDING)
    np.testing.assert_allclose(again[0], first[3], **BATCH_ROUNDING)
    fresh = np.array(out["fresh"])
    assert np.abs(fresh[0] - fresh[1]).max() > 1e-3, "a negative seed drew the same sample twice"


@pytest.mark.e2e
def test_saved_model_cli_shows_and_runs(exported, tmp_path):
    _, path = exported
    np.save(tmp_path / "x.npy", _images(2))
    cli = [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    shown = subprocess.run([*cli, "show", "--dir", path, "--all"], env=_env(),
                           capture_output=True, text=True, timeout=300)
    for name in SIGNATURES:
        assert f"signature_def['{name}']" in shown.stdout, shown.stderr[-2000:]
    ran = subprocess.run([*cli, "run", "--dir", path, "--tag_set", "serve", "--signature_def",
                          "classify", "--inputs", f"x={tmp_path / 'x.npy'}"],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert "p_y" in ran.stdout and "label" in ran.stdout, ran.stderr[-2000:]


@pytest.fixture(scope="module")
def loaded(exported):
    return tf.saved_model.load(exported[1])


@pytest.mark.e2e  # needs the module's export (45 s on a 2-core AVX2 machine)
@pytest.mark.parametrize("signature,kwargs,message", [
    ("classify", dict(x=tf.fill([1, 6, 6, 1], 1.5)), r"values in \[0, 1\]"),
    ("encode", dict(x=tf.fill([1, 6, 6, 1], -0.1)), r"values in \[0, 1\]"),
    ("log_likelihood_200", dict(x=tf.fill([2, 6, 6, 1], 2.0)), r"x must be float32 \[N,6,6,1\]"),
    ("sample_class", dict(y=tf.constant([0, 3]), seed=tf.constant([0, 0])),
     r"values in \[0, 3\)"),
    ("sample_class", dict(y=tf.constant([0, 1]), seed=tf.constant([0, 0, 0])),
     "the same length N"),
])
def test_bad_inputs_name_the_expected_shape_or_range(loaded, signature, kwargs, message):
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        loaded.signatures[signature](**kwargs)


@pytest.mark.e2e  # a whole training run or export
def test_second_export_is_a_new_version_and_traces_each_signature_once(model, tmp_path,
                                                                        monkeypatch):
    export_dir = str(tmp_path / "serve")
    first = serving.export(model, export_dir)
    stamp = os.path.getmtime(os.path.join(first, "saved_model.pb"))
    traced = []  # a Python call of the model's method is a trace of the signature using it

    def counted(method, original):
        def call(*args, **kwargs):
            traced.append(method)
            return original(*args, **kwargs)
        return call

    for method in ("reconstruct", "encode"):
        monkeypatch.setattr(model, method, counted(method, getattr(model, method)))
    second = serving.export(model, export_dir)
    assert sorted(traced) == ["encode", "reconstruct"]  # a second trace doubled export times
    assert (os.path.basename(first), os.path.basename(second)) == ("1", "2")
    assert os.path.getmtime(os.path.join(first, "saved_model.pb")) == stamp
    assert sorted(os.listdir(export_dir)) == ["1", "2"]  # no temporary left behind


@pytest.mark.e2e
def test_export_cli_and_sample_tool(model, tmp_path):
    run = tmp_path / "run"
    os.makedirs(run / "checkpoints")
    files.write_json(str(run / rundir.MODEL), model.get_config())
    model.checkpoint().save(str(run / "checkpoints" / "ckpt"))
    result = subprocess.run([sys.executable, "export/main.py", f"--model_dir={run}"], cwd=ROOT,
                            env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.listdir(run / "export") == ["1"]
    out = tmp_path / "grid.png"
    result = subprocess.run([sys.executable, "export/sample.py", f"--saved_model={run}/export/1",
                             "--num=9", "--label=2", f"--out={out}"], cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--num is deprecated; use --num_samples" in result.stderr  # the old name works
    assert tf.io.decode_png(tf.io.read_file(str(out))).shape == (18, 18, 1)
    bad = subprocess.run([sys.executable, "export/main.py", f"--model_dir={tmp_path}/nothing"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "error:" in bad.stderr.splitlines()[-1]
    bad = subprocess.run([sys.executable, "export/sample.py", f"--saved_model={run}/export/1",
                          "--label=7", f"--out={out}"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "values in [0, 3)" in bad.stderr.splitlines()[-1]
    (tmp_path / "a_file").write_text("")
    for script, args, message in (
            ("sample.py", [f"--saved_model={run}/export/1", f"--out={tmp_path}/no/grid.png"],
             "create it first"),
            ("sample.py", [f"--saved_model={run}/export/1", "--seed=2147483000"],
             "must fit in int32"),
            ("main.py", [f"--model_dir={run}", f"--export_dir={tmp_path}/a_file/export"],
             "cannot create it")):
        bad = subprocess.run([sys.executable, f"export/{script}", *args], cwd=ROOT, env=_env(),
                             capture_output=True, text=True, timeout=300)
        assert bad.returncode != 0 and message in bad.stderr.splitlines()[-1], bad.stderr[-2000:]
    assert not os.path.exists(tmp_path / "no")


def test_restored_checkpoint_gives_the_trained_weights(model, tmp_path):
    run = tmp_path / "run"
    os.makedirs(run / "checkpoints")
    files.write_json(str(run / rundir.MODEL), model.get_config())
    model.checkpoint().save(str(run / "checkpoints" / "ckpt"))
    restored = rundir.load_model(str(run))
    for a, b in zip(model.variables, restored.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_checkpoint_of_another_model_is_refused_in_one_line(model, tmp_path):
    run = tmp_path / "run"
    os.makedirs(run / "checkpoints")
    files.write_json(str(run / rundir.MODEL), {**model.get_config(), "z1_dim": 5})
    model.checkpoint().save(str(run / "checkpoints" / "ckpt"))
    with pytest.raises(rundir.RunError, match="does not hold the variables") as error:
        rundir.load_model(str(run))
    assert "\n" not in str(error.value)


def _write_png(path, image):
    tf.io.write_file(str(path), tf.io.encode_png(tf.constant(image, tf.uint8)))


@pytest.mark.e2e
def test_own_images_are_converted_and_scored(model, exported, tmp_path):
    _, path = exported
    folder = tmp_path / "mine"
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    ink = (rng.random((6, 6, 1)) < 0.3).astype(np.uint8) * 255
    _write_png(folder / "a_small_gray.png", ink)                                 # as trained
    paper = 255 - np.repeat(np.kron(ink, np.ones((2, 2, 1), np.uint8)), 3, axis=-1)
    _write_png(folder / "b_big_colour.png", paper)                   # 12x12 RGB, dark ink
    (folder / "c_broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("ignored")
    out = tmp_path / "scores.csv"
    result = subprocess.run([sys.executable, "export/classify.py", f"--saved_model={path}",
                             f"--images={folder}", f"--out={out}"], cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped c_broken.png: unreadable" in result.stderr
    rows = list(csv.DictReader(open(out)))
    assert [r["image"] for r in rows] == ["a_small_gray.png", "b_big_colour.png"]
    assert rows[0]["note"] == ""
    assert "grayscale" in rows[1]["note"] and "resized from 12x12" in rows[1]["note"] \
        and "inverted" in rows[1]["note"]
    # Same ink after conversion (0/1 pixels binarize to themselves), so the same scores.
    scores = [{k: v for k, v in row.items() if k not in ("image", "note")} for row in rows]
    assert scores[0] == scores[1]
    p_y = [float(rows[0][f"p_y_{k}"]) for k in range(K)]
    assert abs(sum(p_y) - 1) < 1e-4 and 0 <= int(rows[0]["class_p"]) < K
    assert float(rows[0]["log_likelihood_200"]) < 0
    # The model's own posterior, as classify_posterior answers for the converted image.
    own = [float(rows[0][f"posterior_y_{k}"]) for k in range(K)]
    served = tf.saved_model.load(path).signatures["classify_posterior"](
        x=tf.constant(ink[None] / 255, tf.float32))
    np.testing.assert_allclose(own, served["p_y"][0], atol=1e-5)
    assert int(rows[0]["class_posterior"]) == int(served["label"][0])
    # Six decimals as written, not the digits of float32's nearest value.
    vectors = ("posterior_y_", "p_y_", "q_y_", "z2_")
    assert all(len(value.split(".")[-1]) <= 6 for key, value in rows[0].items()
               if key.startswith(vectors)), rows[0]
    # The run's images as an .npz, scored as JSON lines with the other signature.
    np.savez(tmp_path / "x.npz", x_test=(_images(3) > 0.5).astype(np.uint8) * 255)
    result = subprocess.run([sys.executable, "export/classify.py", f"--saved_model={path}",
                             f"--images={tmp_path / 'x.npz'}", "--likelihood=log_likelihood_1000",
                             f"--out={tmp_path / 's.jsonl'}"], cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in open(tmp_path / "s.jsonl")]
    assert len(lines) == 3 and len(lines[0]["z2"]) == 2 and "log_likelihood_1000" in lines[0]
    assert len(lines[0]["posterior_y"]) == K and 0 <= lines[0]["class_posterior"] < K
    os.makedirs(tmp_path / "empty")
    np.savez(tmp_path / "blank.npz")
    for args, message in ((f"--images={tmp_path / 'empty'}", "no PNG or JPEG files"),
                          (f"--images={tmp_path / 'nothing'}", "no such file or folder"),
                          (f"--images={tmp_path / 'blank.npz'}", "holds no array"),
                          (f"--batch_size=0 --images={folder}",
                           "--batch_size 0: must be at least 1")):
        bad = subprocess.run([sys.executable, "export/classify.py", f"--saved_model={path}",
                              *args.split(" ")], cwd=ROOT, env=_env(), capture_output=True, text=True,
                             timeout=300)
        assert bad.returncode != 0 and message in bad.stderr.splitlines()[-1]


@pytest.mark.e2e  # a whole training run or export
def test_every_signature_answers_a_row_in_a_batch_as_it_answers_it_alone(exported):
    """What TF Serving's server-side batching relies on: a row's answer never depends on the
    rows batched with it."""
    _, path = exported
    loaded = tf.saved_model.load(path)
    # More rows than a block of the likelihood signatures and of classify_posterior, not a
    # multiple of either.
    n = max(serving.IW_ROWS, serving.POSTERIOR_ROWS) + 3
    # Alone: the first rows, both sides of each block boundary and a row left over.
    checked = sorted({0, 1, n - 1} | {b + d for b in (serving.IW_ROWS, serving.POSTERIOR_ROWS)
                                       for d in (-1, 0)})
    x = tf.constant(_images(n, seed=3))
    y, seed = tf.constant(np.arange(n) % K, tf.int32), tf.constant(5 + np.arange(n), tf.int32)
    inputs = {"sample": {"seed": seed}, "sample_class": {"y": y, "seed": seed}}
    assert set(loaded.signatures) >= {"classify", "classify_posterior", "sample",
                                      "sample_class", "encode", "reconstruct",
                                      "log_likelihood_200", "log_likelihood_sampled_200"}
    for name, signature in loaded.signatures.items():
        args = inputs.get(name, {"x": x})
        batched = signature(**args)
        for i in checked:
            alone = signature(**{k: v[i:i + 1] for k, v in args.items()})
            for key, value in batched.items():
                np.testing.assert_allclose(alone[key].numpy()[0], value.numpy()[i],
                                           err_msg=f"{name}:{key}", **BATCH_ROUNDING)


@pytest.mark.parametrize("n", [0, 1, 5, 8, 16, 19])
def test_blocks_of_rows_give_each_row_its_own_value_and_compute_no_padding(n):
    x = tf.reshape(tf.range(n * 6, dtype=tf.float32), [n, 2, 3])
    computed = tf.Variable(0)

    def row_sums(block):
        computed.assign_add(tf.shape(block)[0])
        return tf.reduce_sum(block, [1, 2])

    values = tf.function(lambda x: serving._in_blocks(row_sums, x, 8))(x)
    np.testing.assert_array_equal(values.numpy(), tf.reduce_sum(x, [1, 2]).numpy())
    assert computed.numpy() == n
    # A vector per row (classify_posterior's [N,K]) keeps its rows in order too.
    columns = tf.function(lambda x: serving._in_blocks(
        lambda block: tf.reduce_sum(block, 1), x, 8, tail=(3,)))(x)
    np.testing.assert_array_equal(columns.numpy(), tf.reduce_sum(x, 1).numpy())


@pytest.mark.e2e  # needs the module's export, which the end-to-end tests share
def test_an_export_serves_batch_norm_folded_and_leaves_the_model_unfolded(model, exported):
    """The export holds the folded weights (computed once, not per call); the model it came
    from computes with its batch-norm layers again afterwards."""
    _, path = exported
    loaded = tf.saved_model.load(path)
    assert len(loaded.folded_batch_norm) == sum(
        len(getattr(model, name).projections) + 2 * len(getattr(model, name).norms) - 1
        for name in ("q_z1", "q_y", "q_z2", "p_y", "p_z1", "p_x"))
    assert all(getattr(model, name)._folded is None
               for name in ("q_z1", "q_y", "q_z2", "p_y", "p_z1", "p_x"))
