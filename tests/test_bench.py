"""The benchmark's reference model and FLOP count: the comparison they support must be fair."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from cagem_tf.benchmark import flops
from cagem_tf.benchmark.reference import TiledCaGeM
from cagem_tf import objective
from conftest import tiny_cagem


def _pair(**settings):
    """The library's model and the tiled reference with the same weights."""
    model = tiny_cagem(**settings)
    reference = TiledCaGeM(**model.get_config())
    reference.set_weights(model.get_weights())
    return model, reference


def test_tiled_reference_computes_the_same_function():
    model, reference = _pair(num_clusters=3, z1_dim=2, z2_dim=2)
    x = tf.constant(np.random.default_rng(0).integers(0, 2, (6, 5)), tf.float32)
    seed = tf.constant([1, 2])
    for training in (False, True):
        ours = model.elbo(x, num_samples=2, seed=seed, training=training)
        theirs = reference.elbo(x, num_samples=2, seed=seed, training=training)
        for name in ("elbo", "kl_z2", "kl_y"):
            np.testing.assert_allclose(theirs[name], ours[name], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(reference.iw_bound(x, 30, 7, seed), model.iw_bound(x, 30, 7, seed),
                               rtol=1e-5)
    log_q, log_p = model.class_log_probs(x, 3, seed)
    ref_q, ref_p = reference.class_log_probs(x, 3, seed)
    np.testing.assert_allclose(ref_p, log_p, rtol=1e-5, atol=1e-5)


def test_tiled_reference_multiplies_tiled_inputs():
    """The reference's first layers really see [K,S,B, sum d_i] inputs."""
    _, reference = _pair(num_clusters=3)
    y, z1, x = reference.clusters(2), tf.zeros([2, 4, 1]), tf.zeros([4, 5])
    h = reference.q_z2.project([y, z1, x])
    assert h.shape.as_list() == [3, 2, 4, 8]


def _executed_matmul_macs(fn, *args):
    """Multiply-adds of the MatMul ops a tf.function runs: those its outputs and stateful
    control outputs (the variable updates) depend on; TensorFlow prunes the rest."""
    graph = tf.function(fn).get_concrete_function(*args).graph
    seen, stack = set(), [t.op for t in graph.outputs] + list(graph.control_outputs)
    while stack:
        op = stack.pop()
        if op.name not in seen:
            seen.add(op.name)
            stack += [t.op for t in op.inputs] + list(op.control_inputs)
    total = 0
    for op in graph.get_operations():
        assert op.type != "BatchMatMulV2", "count batched matmuls too"
        if op.type == "MatMul" and op.name in seen:
            a, b = op.inputs[0].shape.as_list(), op.inputs[1].shape.as_list()
            rows, inner = (a[1], a[0]) if op.get_attr("transpose_a") else a
            total += rows * inner * (b[0] if op.get_attr("transpose_b") else b[1])
    return total


SETTINGS = dict(image_shape=(11,), num_clusters=3, z1_dim=2, z2_dim=3, hidden_lower=(9, 7),
                hidden_upper=(6, 4))


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("labelled", [0, 4])
def test_train_step_flops_match_the_graph(tiled, labelled):
    """bench/flops.py counts exactly the matmuls (forward and backward) the train step runs."""
    model, reference = _pair(**SETTINGS)
    model = reference if tiled else model
    model.compile(keras.optimizers.Adam(), alpha=1.0)
    batch = {"x": tf.zeros([13, 11])}
    if labelled:
        batch.update(x_labelled=tf.zeros([labelled, 11]), y_labelled=tf.zeros([labelled], tf.int32))
    counted = flops.total_macs(flops.train_matmuls(model.get_config(), 13, labelled, tiled))
    assert _executed_matmul_macs(model.train_step, batch) == counted


@pytest.mark.parametrize("estimator", ["exact", "sampled"])
def test_iw_flops_match_the_graph(estimator):
    model = tiny_cagem(**SETTINGS)
    seed = tf.constant([0, 1])
    if estimator == "exact":
        fn = lambda x: objective.iw_log_weights(model.latent_terms(x, 17, seed))  # noqa: E731
    else:
        fn = lambda x: model.sampled_log_weights(x, 17, seed)  # noqa: E731
    counted = flops.total_macs(flops.iw_matmuls(model.get_config(), 5, 17, estimator))
    assert _executed_matmul_macs(fn, tf.zeros([5, 11])) == counted


def test_per_input_projections_remove_multiply_adds_at_paper_size():
    config = dict(image_shape=(28, 28, 1), num_clusters=10, z1_dim=64, z2_dim=32,
                  hidden_lower=(1024, 1024), hidden_upper=(512, 512), num_samples=1,
                  skip_connection=True)
    ours = flops.train_matmuls(config, 100, 0)
    tiled = flops.train_matmuls(config, 100, 0, tiled=True)
    forward = lambda ms: sum(m.rows * m.n_in * m.n_out for m in ms)  # noqa: E731
    assert 0.11 < 1 - forward(ours) / forward(tiled) < 0.14


@pytest.mark.e2e
def test_quick_suite_prints_every_table():
    """bench/throughput.py end to end at toy size: every table and row, a step with the same
    settings in several tables measured once."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "bench/throughput.py", "--suite=quick", "--steps=2",
                             "--windows=2", "--repeats=1"], cwd=root, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for header in ("| data pipeline |", "| square matmul", "| train step |",
                   "| train step by precision |",
                   "| train step, images and networks |",
                   "| per-input projections vs tiled reference", "| IW bound |"):
        assert header in out, out
    rows = [line for line in out.splitlines() if line.startswith("| 64/32, K=10")]
    assert len(rows) == 9, out
    assert "| train step by optimizer |" in out and sum("Keras' Adam" in r for r in rows) == 1
    assert sum("fused Adam" in r for r in rows) == 1, out
    assert sum("discretized_logistic, conv, 28x28x3" in r for r in rows) == 1, out
    assert sum("mixed_bfloat16" in r for r in rows) == 1, out
    # The float32 step with the fused Adam is one measurement shown in three tables.
    same = [r.split(" | ", 1)[1] for r in rows if r.count(" | ") == 7  # the train tables
            and r.split(" | ")[0] in ("| 64/32, K=10", "| 64/32, K=10, float32",
                                     "| 64/32, K=10, fused Adam (`cagem_tf.optimizer`)")]
    assert len(same) == 3 and len(set(same)) == 1, out


def test_the_pytorch_comparison_needs_a_python_and_says_so_in_one_line(tmp_path):
    code, last = _bench_error("bench/versus_torch.py", f"--torch_python={tmp_path / 'no-python'}")
    assert code != 0 and last.startswith("error: --torch_python") and \
        "pip install torch" in last


def test_the_code_comparison_refuses_a_directory_without_the_library_in_one_line(tmp_path):
    code, last = _bench_error("bench/versus_code.py", f"--baseline={tmp_path}")
    assert code != 0 and last.startswith(f"error: --baseline {tmp_path}: no ") and \
        "git worktree add" in last


@pytest.mark.e2e
def test_the_code_comparison_measures_each_checkout_with_its_own_code(tmp_path, monkeypatch):
    """The baseline's processes import the baseline: a copy of the library whose train
    measurement reports 1 example/s is what the table shows for it, alternating rounds."""
    import shutil
    from cagem_tf.benchmark import throughput, versus_code
    shutil.copytree(os.path.join(throughput.ROOT, "cagem_tf"), tmp_path / "cagem_tf")
    child = tmp_path / versus_code.CHILD
    main = 'if __name__ == "__main__":'
    child.write_text(child.read_text().replace(
        main, "def measure_train(spec):\n    return {'examples_per_s': 1.0}\n\n\n" + main))
    monkeypatch.setitem(throughput.SETTINGS, "steps", 2)
    monkeypatch.setitem(throughput.SETTINGS, "windows", 1)
    lines = []
    spec = versus_code.program_row({"lower": 64, "upper": 32}, labels=10)
    result = versus_code.run(str(tmp_path), 2, spec, out=lines.append)
    assert result["baseline"] == [1.0, 1.0]
    assert all(v > 1.0 for v in result["this checkout"])
    assert result["ratios"] == result["this checkout"]
    table = "\n".join(lines)
    assert "| baseline (" in table and "not a git checkout" in table
    assert table.splitlines()[-1].startswith("| this checkout / baseline |")


def _bench_error(program, *args):
    """(exit code, last line of stderr) of a bench program run from the repository."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, program, *args], cwd=root, capture_output=True,
                            text=True, timeout=120)
    return result.returncode, result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("programs", [(1, 2), (0, 0)])
def test_the_full_suite_measures_precision_with_the_programs_threads_where_they_differ(
        monkeypatch, programs):
    from cagem_tf import cpu
    from cagem_tf.benchmark import throughput
    monkeypatch.setattr(cpu, "default_threads", lambda available=None: programs)
    monkeypatch.setitem(throughput.SETTINGS, "suite", "full")
    rows = [(spec["lower"], spec["precision"]) for table, spec in throughput.suite()
            if table == "precision" and (spec.get("intra"), spec.get("inter")) == (1, 2)]
    expected = [(w, p) for w in (1024, 500) for p in ("float32", "mixed_bfloat16")]
    assert rows == (expected if programs == (1, 2) else [])


def test_the_throughput_bench_names_its_tables_when_asked_for_another():
    code, last = _bench_error("bench/throughput.py", "--only=train,speed")
    assert code != 0 and last.startswith("error: --only speed: no such table") \
        and "optimizer" in last


def test_the_serving_bench_refuses_a_directory_without_a_saved_model_in_one_line(tmp_path):
    code, last = _bench_error("bench/serving.py", f"--saved_model={tmp_path},~/runs/x/export/1")
    assert code != 0 and last.startswith(f"error: --saved_model {tmp_path}: no "
                                         "saved_model.pb there")


def test_the_pytorch_peer_module_is_importable_without_pytorch():
    """The package never depends on PyTorch: the peer imports it only when it runs."""
    import importlib
    import sys
    peer = importlib.import_module("cagem_tf.benchmark.torch_peer")
    assert callable(peer.build) and "torch" not in sys.modules


def test_the_op_profile_finds_the_ops_a_function_runs_and_their_time(tmp_path):
    """A function of matmuls and one cheap elementwise op: MatMul takes most of the op time,
    each traced execution is counted, and the op time fits in the cores over the wall time."""
    import os
    from cagem_tf.benchmark import ops
    a = tf.random.normal([512, 512])

    @tf.function
    def work():
        h = a
        for _ in range(4):
            h = tf.matmul(h, a)
        return tf.nn.relu(h)

    work()
    result = ops.profile(lambda: [work() for _ in range(3)], str(tmp_path))
    seconds = result["ops"]
    assert seconds["MatMul"] > 0.5 * sum(seconds.values()), seconds
    assert "Relu" in seconds
    assert sum(seconds.values()) <= result["traced_wall_s"] * (os.cpu_count() + 1)
    assert 0 < result["wall_s"] < 60
    text = ops.table(result, calls=3, top=1)
    assert text.splitlines()[2].startswith("| MatMul |") and "(other ops)" in text


@pytest.mark.e2e
def test_the_op_profile_of_the_bfloat16_step_shows_its_casts():
    """bench/ops.py --precision mixed_bfloat16 at toy size: the float32 weights are cast to
    bfloat16 for the matmuls, so Cast takes a larger share of the op time than in the float32
    step (which casts only a few small tensors)."""
    import os
    import re
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    tables = {}
    for precision in ("float32", "mixed_bfloat16"):
        result = subprocess.run([sys.executable, "bench/ops.py", "--lower=32", "--upper=16",
                                 "--steps=2", "--top=40", f"--precision={precision}"],
                                cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"0 labelled, {precision};" in result.stdout, result.stdout
        tables[precision] = result.stdout
    share = {p: float(re.search(r"^\| Cast \| [\d.]+ \| ([\d.]+)% \|$", t, re.M).group(1))
             if "| Cast |" in t else 0.0 for p, t in tables.items()}
    assert share["mixed_bfloat16"] > max(1.0, 5 * share["float32"]), share


def test_the_op_profile_bench_refuses_a_directory_without_a_saved_model_in_one_line(tmp_path):
    code, last = _bench_error("bench/ops.py", f"--saved_model={tmp_path}")
    assert code != 0 and last.startswith(f"error: --saved_model {tmp_path}: no "
                                         "saved_model.pb there")
