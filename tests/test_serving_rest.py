"""Every signature called as a TF Serving REST client would: JSON bodies in the row format
({"instances": [...]}) and the columnar format ({"inputs": {...}}), turned into tensors the way
the server does, run in a TensorFlow-only process, answered in the server's response layout
("predictions" per instance, or "outputs"). The rules are those of TF Serving's REST API:
a single named input may be given bare; in the row format each instance holds one row of every
input (so all inputs share the first dimension) and the rows are stacked along axis 0; a
single output is answered bare, several as objects of named outputs; a failure is
{"error": message}."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from cagem_tf import serving
from conftest import BATCH_ROUNDING, tiny_cagem

# Real processes and servers: run with -m e2e (see pytest.ini).
pytestmark = pytest.mark.e2e

SHAPE = (6, 6, 1)
K = 3

SERVER = r"""
import json, sys
import numpy as np, tensorflow as tf
model = tf.saved_model.load(sys.argv[1])

def tensors(body, specs):
    names = sorted(specs)
    if "instances" in body:
        rows = body["instances"]
        if len(names) == 1 and not (rows and isinstance(rows[0], dict)):
            columns = {names[0]: rows}
        else:
            for row in rows:
                if set(row) != set(names):
                    raise ValueError(f"each instance must have the inputs {names}")
            columns = {n: [row[n] for row in rows] for n in names}
    else:
        inputs = body["inputs"]
        columns = inputs if isinstance(inputs, dict) else {names[0]: inputs}
        missing = set(names) - set(columns)
        if missing:
            raise ValueError(f"missing inputs {sorted(missing)}")
    return {n: tf.constant(columns[n], dtype=specs[n].dtype) for n in names}

answers = []
for request in json.load(open(sys.argv[2])):
    name, body = request["signature"], request["body"]
    fn = model.signatures[name]
    try:
        out = {k: v.numpy().tolist()
               for k, v in fn(**tensors(body, fn.structured_input_signature[1])).items()}
    except Exception as e:
        message = getattr(e, "message", str(e))
        answers.append({"error": message[:3000]})
        continue
    if "instances" in body:
        n = len(next(iter(out.values())))
        only = next(iter(out.values()))
        answers.append({"predictions": [only[i] for i in range(n)] if len(out) == 1 else
                        [{k: v[i] for k, v in out.items()} for i in range(n)]})
    else:
        answers.append({"outputs": next(iter(out.values())) if len(out) == 1 else out})
print("RESULT" + json.dumps(answers))
"""


@pytest.fixture(scope="module")
def model():
    return tiny_cagem(image_shape=SHAPE, num_clusters=K, z1_dim=3, z2_dim=2)


@pytest.fixture(scope="module")
def export_path(model, tmp_path_factory):
    return serving.export(model, str(tmp_path_factory.mktemp("serve")), iw_samples=(100,))


def serve(path, requests, tmp_path):
    """The answers of a TensorFlow-only process to [{"signature", "body"}]."""
    request_file = tmp_path / "requests.json"
    request_file.write_text(json.dumps(requests))
    result = subprocess.run([sys.executable, "-c", SERVER, path, str(request_file)],
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), cwd="/",
                            capture_output=True, text=True, timeout=600)
    lines = [l for l in result.stdout.splitlines() if l.startswith("RESULT")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    return json.loads(lines[0][len("RESULT"):])


def test_every_signature_answers_both_rest_formats(model, export_path, tmp_path):
    x = np.random.default_rng(0).random((3, *SHAPE)).astype(np.float32)
    rows = x.tolist()
    requests = [
        {"signature": "serving_default", "body": {"instances": rows}},
        {"signature": "classify", "body": {"inputs": {"x": rows}}},
        {"signature": "classify_posterior", "body": {"instances": rows}},
        {"signature": "sample", "body": {"instances": [{"seed": 5}, {"seed": 6}]}},
        {"signature": "sample", "body": {"inputs": {"seed": [5, 6]}}},
        {"signature": "sample_class", "body": {"instances": [{"y": 2, "seed": 5},
                                                             {"y": 0, "seed": 6}]}},
        {"signature": "sample_class", "body": {"inputs": {"y": [2, 0], "seed": [5, 6]}}},
        {"signature": "log_likelihood_100", "body": {"instances": [{"x": r} for r in rows]}},
        {"signature": "log_likelihood_sampled_100", "body": {"inputs": rows}},
        {"signature": "encode", "body": {"instances": rows}},
        {"signature": "reconstruct", "body": {"inputs": {"x": rows}}},
    ]
    (row_classify, column_classify, row_posterior, row_sample, column_sample, row_class,
     column_class, row_ll, column_ll, row_encode, column_reconstruct) = serve(
        export_path, requests, tmp_path)

    seed = tf.constant(serving.CLASSIFIER_SEED)
    assert len(row_classify["predictions"]) == 3
    assert set(row_classify["predictions"][0]) == {"p_y", "q_y", "label"}
    for i in range(3):
        p_y, q_y = model.classify(x[i:i + 1], seed=seed, row_independent=True)
        np.testing.assert_allclose(row_classify["predictions"][i]["p_y"], p_y[0], atol=1e-5)
        np.testing.assert_allclose(column_classify["outputs"]["q_y"][i], q_y[0], atol=1e-5)
    assert [p["label"] for p in row_classify["predictions"]] == column_classify["outputs"]["label"]
    assert set(row_posterior["predictions"][0]) == {"p_y", "label"}
    for i in range(3):
        alone = np.exp(model.posterior_log_probs(x[i:i + 1], serving.POSTERIOR_SAMPLES,
                                                 seed=seed, row_independent=True))
        np.testing.assert_allclose(row_posterior["predictions"][i]["p_y"], alone[0], atol=1e-5)
        assert row_posterior["predictions"][i]["label"] == int(np.argmax(alone[0]))

    # One sample per seed, the same in both formats and as the model draws it.
    assert [p["probs"] for p in row_sample["predictions"]] == column_sample["outputs"]["probs"]
    assert np.array(column_sample["outputs"]["images"]).shape == (2, *SHAPE)
    assert [p["probs"] for p in row_class["predictions"]] == column_class["outputs"]["probs"]
    expected, _ = model.sample(1, y=tf.constant([2]), seed=tf.constant([5, 0]))
    np.testing.assert_allclose(column_class["outputs"]["probs"][0], expected[0], atol=1e-5)

    # A single output is answered bare: a list of numbers.
    assert np.array(row_ll["predictions"]).shape == (3,)
    assert np.array(column_ll["outputs"]).shape == (3,)
    for i in range(3):
        alone = model.iw_bound(x[i:i + 1], 100, seed=seed, row_independent=True)
        np.testing.assert_allclose(row_ll["predictions"][i], alone[0], rtol=1e-4)
    z1, z2 = model.encode(x)
    np.testing.assert_allclose([p["z2"] for p in row_encode["predictions"]], z2, atol=1e-5)
    np.testing.assert_allclose(column_reconstruct["outputs"], model.reconstruct(x), atol=1e-5)


def test_a_row_gets_the_same_answer_alone_or_batched_with_others(export_path, tmp_path):
    x = np.random.default_rng(1).random((4, *SHAPE)).astype(np.float32).tolist()
    alone, batched, sample_alone, sample_batched = serve(export_path, [
        {"signature": "classify", "body": {"instances": x[:1]}},
        {"signature": "classify", "body": {"instances": x}},
        {"signature": "sample", "body": {"inputs": {"seed": [11]}}},
        {"signature": "sample", "body": {"inputs": {"seed": [3, 11, 4]}}},
    ], tmp_path)
    # Floats equal up to BATCH_ROUNDING; the discrete answers exactly the same.
    one, same = alone["predictions"][0], batched["predictions"][0]
    assert one["label"] == same["label"]
    for key in ("p_y", "q_y"):
        np.testing.assert_allclose(one[key], same[key], err_msg=key, **BATCH_ROUNDING)
    np.testing.assert_allclose(sample_alone["outputs"]["probs"][0],
                               sample_batched["outputs"]["probs"][1], **BATCH_ROUNDING)
    assert sample_alone["outputs"]["images"][0] == sample_batched["outputs"]["images"][1]
    assert sample_alone["outputs"]["y"][0] == sample_batched["outputs"]["y"][1]


def test_bad_requests_get_an_error_body_not_a_crash(export_path, tmp_path):
    good = np.zeros((1, *SHAPE)).tolist()
    answers = serve(export_path, [
        {"signature": "sample_class", "body": {"inputs": {"y": [1]}}},               # missing
        {"signature": "sample_class", "body": {"instances": [{"y": 1}]}},            # missing
        {"signature": "classify", "body": {"instances": [[[0.5] * 6] * 5]}},         # shape
        {"signature": "classify", "body": {"instances": (np.ones((1, *SHAPE)) * 2).tolist()}},
        {"signature": "sample_class", "body": {"inputs": {"y": [1, 2], "seed": [1]}}},  # sizes
        {"signature": "sample_class", "body": {"inputs": {"y": [7], "seed": [1]}}},  # range
        {"signature": "classify", "body": {"instances": good}},                      # still up
    ], tmp_path)
    assert all("error" in a for a in answers[:6]), answers
    assert "seed" in answers[0]["error"] and "seed" in answers[1]["error"]
    assert "values in [0, 1]" in answers[3]["error"]
    assert "the same length N" in answers[4]["error"]
    assert "values in [0, 3)" in answers[5]["error"]
    assert len(answers[6]["predictions"]) == 1
