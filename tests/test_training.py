"""The train step: gradients of the cross-entropies, batch-norm statistics, and learning."""

import functools
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from cagem_tf import CaGeM, data, objective, schedules, training
from cagem_tf.config import Config
from cagem_tf.model import NOT_IN_POSITIONAL_CHECKPOINTS
from conftest import clustered_npz, tiny_cagem

REPRESENTATION_NETS = ("q_z1", "q_z2", "p_z1", "p_x")
CLASSIFIER_NETS = ("p_y", "q_y")


def _batches(seed=0):
    rng = np.random.default_rng(seed)
    x_u = rng.integers(0, 2, size=(16, 5)).astype(np.float32)
    x_l = rng.integers(0, 2, size=(6, 5)).astype(np.float32)
    y_l = np.array([0, 1, 0, 1, 1, 0], np.int32)
    return x_u, x_l, y_l


def _values(model, name, trainable=None):
    net = getattr(model, name)
    variables = {None: net.variables, True: net.trainable_variables,
                 False: net.non_trainable_variables}[trainable]
    return {v.path: np.array(v.numpy()) for v in variables}


def _compiled(alpha=5.0):
    model = tiny_cagem(z1_dim=2, z2_dim=2)
    model.compile(keras.optimizers.SGD(0.1), alpha=alpha)
    return model


def test_cross_entropy_reaches_only_the_classifiers():
    x_u, x_l, y_l = _batches()
    with_labels, without = _compiled(), _compiled()
    for name in REPRESENTATION_NETS + CLASSIFIER_NETS:   # the same start, seeds included
        for a, b in zip(_values(with_labels, name).values(), _values(without, name).values()):
            np.testing.assert_array_equal(a, b)
    with_labels.train_step({"x": x_u, "x_labelled": x_l, "y_labelled": y_l})
    without.train_step({"x": x_u})

    for name in REPRESENTATION_NETS:
        a, b = _values(with_labels, name), _values(without, name)
        for path in a:
            np.testing.assert_array_equal(a[path], b[path], err_msg=path)
    for name in CLASSIFIER_NETS:
        a, b = _values(with_labels, name, True), _values(without, name, True)
        for path in a:
            assert np.abs(a[path] - b[path]).max() > 1e-7, f"{path} did not get the labels"
        a, b = _values(with_labels, name, False), _values(without, name, False)
        for path in a:  # moving statistics come from the unlabelled pass alone
            np.testing.assert_array_equal(a[path], b[path], err_msg=path)


def test_cross_entropy_would_reach_the_representation_without_the_restriction():
    """The control for the test above: the cross-entropies do depend on q(z1|x) and q(z2|...)."""
    model = _compiled()
    _, x_l, y_l = _batches()
    with tf.GradientTape() as tape:
        log_q, log_p = model.class_log_probs(x_l, 1, tf.constant([1, 2]), training=True,
                                             collect=False)
        ce = objective.cross_entropy(log_p, y_l) + objective.cross_entropy(log_q, y_l)
    variables = model.q_z1.trainable_variables + model.q_z2.trainable_variables
    grads = tape.gradient(ce, variables)
    assert max(float(tf.reduce_max(tf.abs(g))) for g in grads) > 1e-6


def _moving_statistics(model):
    return {v.path: np.array(v.numpy()) for v in model.non_trainable_variables
            if "moving" in v.path}


def test_labelled_pass_collects_no_batch_norm_statistics():
    model = tiny_cagem()
    _, x_l, y_l = _batches()
    before = _moving_statistics(model)
    assert len(before) == 2 * 2 * 6  # mean and variance, 2 layers, 6 networks
    seed = tf.constant([3, 3])
    log_q_train, _ = model.class_log_probs(x_l, 2, seed, training=True, collect=False)
    for path, value in _moving_statistics(model).items():
        np.testing.assert_array_equal(value, before[path], err_msg=path)
    log_q_infer, _ = model.class_log_probs(x_l, 2, seed, training=False)
    assert np.abs(log_q_train - log_q_infer).max() > 1e-4  # it did normalise with batch moments

    model.latent_terms(x_l, 2, seed, training=True)        # the unlabelled pass collects
    after = _moving_statistics(model)
    for path, value in after.items():
        assert np.abs(value - before[path]).max() > 0, path


def test_learns_clusters_from_a_handful_of_labels():
    """Three clustered binary patterns, two labels each: the test ELBO rises and both classifiers
    beat chance (1/3).

    q(y|x) reaches near-perfect accuracy. The cascade p(y|x) reads y from z2, and on data whose
    only structure is the cluster the ELBO gains little from putting y into z2 once the warm-up
    ends (z2 carrying y costs about what kl_y saves), so it is held to a lower bar here.
    """
    rng = np.random.default_rng(0)
    D, K = 24, 3
    prototypes = rng.random((K, D)) < 0.5

    def draw(n):
        y = rng.integers(0, K, n)
        flips = rng.random((n, D)) < 0.1
        return (prototypes[y] ^ flips).astype(np.float32), y.astype(np.int32)

    x_train, y_train = draw(1200)
    x_test, y_test = draw(300)
    labelled = np.concatenate([np.flatnonzero(y_train == k)[:2] for k in range(K)])
    keras.utils.set_random_seed(1)
    model = CaGeM(image_shape=(D,), num_clusters=K, z1_dim=4, z2_dim=2, hidden_lower=(32, 32),
                  hidden_upper=(32, 32), seed=1)
    model.compile(keras.optimizers.Adam(3e-3),
                  alpha=objective.alpha(0.1, len(x_train), len(labelled)),
                  steps_per_execution=10)  # the programs' default; fewer Python calls
    x_l = tf.data.Dataset.from_tensor_slices(
        (x_train[labelled], y_train[labelled])).repeat().shuffle(6, seed=0).batch(6)
    x_u = tf.data.Dataset.from_tensor_slices(x_train).repeat().shuffle(1200, seed=0).batch(50)
    data = tf.data.Dataset.zip(x_u, x_l).map(
        lambda x, labelled: {"x": x, "x_labelled": labelled[0], "y_labelled": labelled[1]})
    elbo_before = float(tf.reduce_mean(model.elbo(x_test, seed=tf.constant([0, 0]))["elbo"]))
    warmup = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: model.temperature.assign(min(1.0, epoch / 4)))
    model.fit(data, steps_per_epoch=100, epochs=8, verbose=0, callbacks=[warmup])
    elbo_after = float(tf.reduce_mean(model.elbo(x_test, seed=tf.constant([0, 0]))["elbo"]))
    p_y, q_y = model.classify(x_test, num_samples=10, seed=tf.constant([0, 1]))
    accuracy_p = np.mean(np.argmax(p_y, -1) == y_test)
    accuracy_q = np.mean(np.argmax(q_y, -1) == y_test)
    assert elbo_after > elbo_before + 2.0, (elbo_before, elbo_after)
    assert accuracy_q > 0.9 and accuracy_p > 0.5, (accuracy_p, accuracy_q)


def test_warmup_temperature_is_linear_in_steps():
    from cagem_tf.callbacks import step_decay
    warmup = schedules.Linear("temperature", start=0.0, epochs=4, end=1.0)
    assert warmup(0) == 0.0 and warmup.name == "temperature"
    assert warmup(0.5) == pytest.approx(0.5 / 4) and warmup(2.5) == pytest.approx(2.5 / 4)
    assert warmup(7.3) == 1.0
    assert schedules.Linear("temperature", start=0.0, epochs=0, end=1.0)(0) == 1.0
    schedule = step_decay(1e-3, 0.75, 50)
    assert [schedule(e) for e in (0, 49, 50, 120)] == pytest.approx(
        [1e-3, 1e-3, 0.75e-3, 0.75 ** 2 * 1e-3])


_X = (np.random.default_rng(0).random((8, 5)) < 0.5).astype(np.float32)
_LABELLED = {"x": _X, "x_labelled": _X[:4], "y_labelled": np.array([0, 1, 0, 1])}
_MOVED = [schedules.Linear("temperature", start=0.0, epochs=2, end=1.0),
          schedules.Linear("label_weight", "alpha", start=50.0, epochs=2, end=10.0)]


@functools.lru_cache(maxsize=None)
def _fitted(labelled: bool, steps_per_execution: int):
    """(history, model): a tiny CaGeM fitted for 3 epochs of 5 copies of one batch under the
    warm-up's schedule, with labels also alpha's (10 at the end). Shared by the tests below,
    which only read it."""
    batch = _LABELLED if labelled else {"x": _X}
    data = tf.data.Dataset.from_tensors(batch).repeat(5)
    model = tiny_cagem()
    model.compile(keras.optimizers.SGD(0.05), alpha=10.0 * labelled,
                  steps_per_execution=steps_per_execution)
    model.schedule(_MOVED if labelled else _MOVED[:1], steps_per_epoch=5)
    return model.fit(data, epochs=3, verbose=0).history, model


def test_the_step_sets_its_scheduled_weights_every_step_however_many_steps_a_call_runs():
    """The schedules are computed in the step from the optimizer's count: with one step per
    call or several (Keras' steps_per_execution, here 3, which does not divide the epoch's 5
    steps: the last call of an epoch runs 2) each step uses the weights of its own t."""
    # The logged alpha is the epoch's mean of the values its steps used.
    expected = [np.mean([_MOVED[1](epoch + b / 5) for b in range(5)]) for epoch in range(3)]
    assert expected[0] > expected[1] > expected[2] == 10.0
    for steps_per_execution in (1, 3):
        history, model = _fitted(True, steps_per_execution)
        assert history["alpha"] == pytest.approx(expected, rel=1e-6)
        assert float(model.temperature) == 1.0 and int(model.optimizer.iterations) == 15
    # A run resumed at step 7 continues the line: its first step uses t = 7 / 5.
    model = tiny_cagem()
    model.compile(keras.optimizers.SGD(0.05), alpha=10.0)
    model.schedule(_MOVED, steps_per_epoch=5)
    model.optimizer.iterations.assign(7)
    out = model.train_step(_LABELLED)
    assert float(out["alpha"]) == pytest.approx(_MOVED[1](7 / 5))
    assert float(model.temperature) == pytest.approx(7 / 10)


@pytest.mark.parametrize("labelled", [False, True])
def test_one_and_three_steps_per_call_train_the_same_model(labelled):
    """Under the KL warm-up's schedule (and alpha's, with labels), 1 and 3 steps per call give
    the same losses and weights. With labelled batches this failed now and then until each
    update was made to wait for the step's values (`CaGeM._ordered`; docs/results.md,
    "Several steps per call"); the ordering itself is tested on the graph below."""
    (first, a), (second, b) = _fitted(labelled, 1), _fitted(labelled, 3)
    assert first["loss"] == pytest.approx(second["loss"], rel=1e-6)
    assert first["loss"][0] != pytest.approx(first["loss"][2], rel=1e-2)  # it learned
    for va, vb in zip(a.weights, b.weights):
        np.testing.assert_allclose(va.numpy(), vb.numpy(), atol=1e-6, err_msg=va.path)


def _grappled_steps(model, batch, steps: int):
    """The GraphDef of `steps` train steps in one tf.function after Grappler's default passes,
    as TensorFlow runs it (Grappler has no public API: `tf_optimizer` is TensorFlow's own)."""
    from tensorflow.core.protobuf import config_pb2
    from tensorflow.python.grappler import tf_optimizer

    graph = tf.function(lambda: [model.train_step(batch)["loss"] for _ in range(steps)]
                        ).get_concrete_function().graph
    meta = tf.compat.v1.train.export_meta_graph(graph_def=graph.as_graph_def(), graph=graph)
    meta.collection_def["train_op"].node_list.value.extend(
        [t.op.name for t in graph.outputs] + [op.name for op in graph.control_outputs])
    return tf_optimizer.OptimizeGraph(config_pb2.ConfigProto(), meta)


def _reads_and_writes(graph_def):
    """{variable: {"reads", "writes"}}: the ops that use each resource variable, and the
    (read, write) pairs of ops on one variable with no path between them."""
    nodes = {n.name: n for n in graph_def.node}
    parents = {n.name: [i.lstrip("^").split(":")[0] for i in n.input] for n in graph_def.node}
    children = {}
    for name, inputs in parents.items():
        for p in inputs:
            children.setdefault(p, set()).add(name)

    def variable(name):  # the resource placeholder behind Identity nodes, if any
        while nodes[name].op == "Identity":
            name = parents[name][0]
        node = nodes[name]
        is_resource = node.attr["dtype"].type == tf.resource.as_datatype_enum
        return name if node.op == "Placeholder" and is_resource else None

    def reach(start, edges):
        seen, todo = set(), [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    touched = {}
    for n in graph_def.node:
        if n.op != "Identity":
            for p in parents[n.name]:
                if p in nodes and variable(p):
                    touched.setdefault(variable(p), {"reads": [], "writes": []})[
                        "writes" if n.op.startswith(("Assign", "ResourceApply")) else "reads"
                    ].append(n.name)
    unordered = []
    for ops in touched.values():
        for write in ops["writes"]:
            related = reach(write, parents) | reach(write, children)
            unordered += [(read, write) for read in ops["reads"] if read not in related]
    return touched, unordered


@pytest.mark.parametrize("optimizer, departures", [
    ("sgd", {}), ("fused_adam", {}),
    ("fused_adam", {"cluster_usage": True, "z2_code": True, "labelled_elbo": True})],
    ids=["sgd", "fused_adam", "fused_adam_and_departures"])
def test_after_grappler_every_read_of_a_variable_in_the_steps_is_ordered_with_its_updates(
        optimizer, departures):
    """Two labelled steps in one graph, as Grappler leaves it: each read of a variable comes
    before or after each update of it. Grappler's dependency optimizer once dropped the edges
    from the labelled pass's reads of q(z1|x) and q(z2|.) to their updates (docs/results.md,
    "Several steps per call"), and a step then now and then read updated weights."""
    from cagem_tf.optimizer import Adam
    batch = {key: tf.constant(value) for key, value in _LABELLED.items()}
    model = tiny_cagem()
    model.compile({"sgd": keras.optimizers.SGD(0.05), "fused_adam": Adam(1e-3)}[optimizer],
                  alpha=10.0, **departures)
    touched, unordered = _reads_and_writes(_grappled_steps(model, batch, steps=2))
    updated = [ops for ops in touched.values() if len(ops["writes"]) >= 2]
    assert len(updated) >= len(model.trainable_variables)  # every update of both steps found
    assert sum(len(ops["reads"]) for ops in updated) > 2 * len(updated)
    assert unordered == []


def test_batch_norm_moments_cover_every_leading_axis():
    """Built on rank 2, called on rank 3: the moments are over the sample and batch axes."""
    from cagem_tf.networks import BatchNorm
    norm = BatchNorm()
    norm(tf.zeros([4, 3]), training=False)
    x = tf.random.stateless_normal([5, 7, 3], seed=[1, 2]) * 3.0 + 2.0
    for collect in (True, False):
        out = norm(x, training=True, collect=collect).numpy()
        np.testing.assert_allclose(out.mean(axis=(0, 1)), 0.0, atol=1e-5)
        np.testing.assert_allclose(out.std(axis=(0, 1)), 1.0, atol=1e-2)


def test_fused_batch_norm_matches_keras_batch_normalization():
    """networks.BatchNorm in training (the fused kernel over all leading axes) gives Keras'
    BatchNormalization on the flattened input: outputs, gradients and moving statistics."""
    from cagem_tf.networks import BatchNorm
    x = tf.random.stateless_normal([3, 4, 50, 16], [1, 2]) * 3.0 + 1.0
    ours, keras_bn = BatchNorm(momentum=0.9), keras.layers.BatchNormalization(momentum=0.9)
    ours.build(x.shape)
    keras_bn.build([None, 16])
    rng = np.random.default_rng(0)
    weights = [rng.normal(1.0, 0.3, 16), rng.normal(0.0, 0.3, 16), rng.normal(0.0, 1.0, 16),
               rng.uniform(0.5, 2.0, 16)]
    ours.set_weights(weights)
    keras_bn.set_weights(weights)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y_ours = ours(x, training=True)
        y_keras = tf.reshape(keras_bn(tf.reshape(x, [-1, 16]), training=True), x.shape)
        loss_ours, loss_keras = tf.reduce_sum(tf.sin(y_ours)), tf.reduce_sum(tf.sin(y_keras))
    np.testing.assert_allclose(y_ours, y_keras, atol=1e-5)
    for a, b in zip(tape.gradient(loss_ours, [x, ours.gamma, ours.beta]),
                    tape.gradient(loss_keras, [x, keras_bn.gamma, keras_bn.beta])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours.moving_mean, keras_bn.moving_mean, atol=1e-6)
    np.testing.assert_allclose(ours.moving_variance, keras_bn.moving_variance, rtol=1e-5)


def test_checkpoints_restore_by_variable_path_and_earlier_positional_ones_still_read(tmp_path):
    trained, fresh = tiny_cagem(seed=3), tiny_cagem(seed=4)
    trained.code_weight.assign(0.5)
    assert any(not np.array_equal(a, b) for a, b in zip(trained.get_weights(),
                                                        fresh.get_weights()))
    path = trained.checkpoint().save(str(tmp_path / "named" / "ckpt"))
    keys = [name for name, _ in tf.train.list_variables(path)]
    assert any(k.startswith("variables/q_z1") for k in keys)  # by path, not by position
    fresh.checkpoint_to_read(path).restore(path).assert_existing_objects_matched()
    for a, b in zip(trained.weights, fresh.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    # The layout of earlier versions: a list in `weights` order without the newer variables.
    earlier = tiny_cagem(seed=5)
    newer = tuple("/" + name for name in NOT_IN_POSITIONAL_CHECKPOINTS)
    old = tf.train.Checkpoint(weights=[v for v in trained.weights
                                       if not v.path.endswith(newer)])
    old_path = old.save(str(tmp_path / "positional" / "ckpt"))
    earlier.checkpoint_to_read(old_path).restore(old_path).assert_existing_objects_matched()
    for a, b in zip(trained.weights, earlier.weights):
        if not a.path.endswith(newer):
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert float(earlier.code_weight) == 0.0
    # A checkpoint by path written before label_weight existed still reads.
    before = tf.train.Checkpoint(variables={
        p: v for p, v in trained.variables_by_path().items() if p != "model/label_weight"})
    before_path = before.save(str(tmp_path / "before" / "ckpt"))
    later = tiny_cagem(seed=6)
    later.checkpoint_to_read(before_path).restore(before_path).assert_existing_objects_matched()
    np.testing.assert_array_equal(later.q_z1.heads[0].kernel.numpy(),
                                  trained.q_z1.heads[0].kernel.numpy())


@pytest.mark.e2e  # two short training runs
def test_labels_seed_picks_the_labelled_subset_and_minus_one_means_the_runs_seed(tmp_path):
    npz = clustered_npz(tmp_path / "tiny.npz", 6, 300, 30)
    y_train = np.arange(300) % 3   # clustered_npz's labels
    tiny = dict(dataset=npz, labels=6, hidden_lower=[8], hidden_upper=[8], z1_dim=2, z2_dim=2,
                batch_size=50, epochs=1, eval_every=0, verbose=0, export_every=-1)

    def subset(**seeds):
        run = str(tmp_path / "_".join(f"{k}{v}" for k, v in seeds.items()))
        training.train(Config(model_dir=run, **tiny, **seeds), log=lambda m: None)
        assert not os.path.exists(os.path.join(run, "export"))  # --export_every -1: none
        return json.load(open(os.path.join(run, "labelled_indices.json")))

    chosen_by = {s: data.labelled_indices(y_train, 6, 3, seed=s).tolist() for s in (0, 3)}
    assert chosen_by[0] != chosen_by[3]
    assert subset(seed=0, labels_seed=3) == chosen_by[3]
    assert subset(seed=0, labels_seed=-1) == chosen_by[0]
