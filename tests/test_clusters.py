"""Cluster measures, k-means, and the opt-in cluster levers and departures."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from cagem_tf import callbacks, clustering, objective, schedules
from conftest import tiny_cagem


def test_nmi_and_ari_are_one_for_the_same_partition_under_any_naming_and_near_zero_by_chance():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 2000)
    renamed = (labels * 3 + 1) % 5  # a permutation of the names
    assert clustering.nmi(renamed, labels) == pytest.approx(1.0)
    assert clustering.ari(renamed, labels) == pytest.approx(1.0)
    assert clustering.purity(renamed, labels) == 1.0
    chance = rng.integers(0, 5, 2000)
    assert clustering.nmi(chance, labels) < 0.01 and abs(clustering.ari(chance, labels)) < 0.01
    assert clustering.nmi(np.zeros(2000, int), labels) == 0.0


def test_usage_counts_clusters_and_mutual_information():
    K, n = 4, 400
    confident = np.eye(K)[np.arange(n) % K]          # every image certain, clusters even
    use = clustering.usage(confident)
    assert use["clusters_used"] == K and use["occupancy"] == [n // K] * K
    assert use["mutual_information"] == pytest.approx(np.log(K))
    assert use["mean_entropy"] == pytest.approx(0.0)
    unsure = np.full([n, K], 1.0 / K)                 # y carries nothing about x
    assert clustering.usage(unsure)["mutual_information"] == pytest.approx(0.0, abs=1e-12)
    one = np.eye(K)[np.r_[np.zeros(n - 5, int), np.ones(5, int)]]  # 5 images: under 2%
    assert clustering.usage(one)["clusters_used"] == 1


def test_kmeans_finds_separated_clusters():
    rng = np.random.default_rng(1)
    centres = rng.normal(0, 10, (3, 5))
    truth = np.arange(300) % 3
    x = centres[truth] + rng.normal(0, 0.5, (300, 5))
    assert clustering.ari(clustering.kmeans(x, 3, seed=0), truth) == pytest.approx(1.0)
    np.testing.assert_array_equal(clustering.kmeans(x, 3, seed=0), clustering.kmeans(x, 3, 0))


def test_shared_noise_uses_one_draw_for_every_cluster():
    model = tiny_cagem(num_clusters=3, z2_dim=2, shared_noise=True)
    x = (np.random.default_rng(0).random((4, 5)) < 0.5).astype(np.float32)
    terms = model.latent_terms(x, 2, seed=tf.constant([1, 2]))
    parts = model.x_parts(x)
    q_z2 = model.q_z2.distribution(model.q_z2_inputs(model.clusters(2), terms["z1"], None),
                                   projected=parts["q_z2"])
    eps = ((terms["z2"] - q_z2.mean()) / q_z2.stddev()).numpy()          # [K,S,B,d2]
    np.testing.assert_allclose(eps[0], eps[1], atol=1e-5)
    np.testing.assert_allclose(eps[0], eps[2], atol=1e-5)
    independent = tiny_cagem(num_clusters=3, z2_dim=2)
    terms = independent.latent_terms(x, 2, seed=tf.constant([1, 2]))
    assert not np.allclose(terms["z2"][0] - terms["z2"][1], 0)


def test_y_init_stddev_sets_the_first_layer_weights_of_y():
    model = tiny_cagem(y_init_stddev=3.0, hidden_upper=(64, 64), hidden_lower=(64, 64))
    for net in (model.q_z2, model.p_z1, model.p_x):
        assert 2.0 < float(np.std(net.projections[0].kernel.numpy())) < 4.0
    assert float(np.std(model.q_z1.projections[0].kernel.numpy())) < 1.0


def test_pseudo_labels_train_only_the_classifier_networks():
    model = tiny_cagem(num_clusters=2)
    model.compile(keras.optimizers.SGD(0.1), pseudo_labels=True)
    model.pseudo_weight.assign(1.0)
    x = (np.random.default_rng(0).random((8, 5)) < 0.5).astype(np.float32)
    y = np.arange(8) % 2
    # The ELBO's gradient is zeroed (learning rate aside) by comparing with and without labels.
    with_labels = model.train_step({"x": x, "y_pseudo": y})
    assert "h_pseudo" in with_labels
    a = tiny_cagem(num_clusters=2)
    a.compile(keras.optimizers.SGD(0.1), pseudo_labels=True)
    b = tiny_cagem(num_clusters=2)
    b.compile(keras.optimizers.SGD(0.1))
    a.pseudo_weight.assign(5.0)
    a.train_step({"x": x, "y_pseudo": y})
    b.train_step({"x": x})
    classifier = {v.path for v in a.classifier_variables}
    for va, vb in zip(a.trainable_variables, b.trainable_variables):
        same = np.allclose(va.numpy(), vb.numpy(), atol=1e-6)
        assert same != (va.path in classifier and "q_y" in va.path), va.path


def test_departures_anneal_to_zero_and_then_leave_the_papers_objective():
    with_term, without = tiny_cagem(num_clusters=2), tiny_cagem(num_clusters=2)
    anneal = schedules.Linear("usage_weight", start=2.0, epochs=4)
    assert anneal(0) == 2.0 and anneal(2) == pytest.approx(1.0)
    assert anneal(4) == 0.0 and anneal(9) == 0.0
    x = (np.random.default_rng(0).random((8, 5)) < 0.5).astype(np.float32)
    with_term.compile(keras.optimizers.SGD(0.1), cluster_usage=True)
    without.compile(keras.optimizers.SGD(0.1))
    with_term.usage_weight.assign(0.0)  # annealed out
    out_a, out_b = with_term.train_step({"x": x}), without.train_step({"x": x})
    assert float(out_a["loss"]) == pytest.approx(float(out_b["loss"]))
    for va, vb in zip(with_term.trainable_variables, without.trainable_variables):
        np.testing.assert_allclose(va.numpy(), vb.numpy(), atol=1e-6)
    # With a positive weight the step moves the model towards a more even use of y: the
    # gradient of the bonus alone (the same step with and without it) raises the batch usage.
    a, b = tiny_cagem(num_clusters=2), tiny_cagem(num_clusters=2)
    a.compile(keras.optimizers.SGD(0.01), cluster_usage=True)
    b.compile(keras.optimizers.SGD(0.01))
    a.usage_weight.assign(20.0)
    usage = lambda m: float(objective.batch_usage(  # noqa: E731
        m.latent_terms(x, 4, seed=tf.constant([0, 1]))["q_y_logits"]))
    c = tiny_cagem(num_clusters=2)
    c.compile(keras.optimizers.SGD(0.01), cluster_usage=True)
    c.usage_weight.assign(-20.0)  # the same bonus with the sign flipped: a penalty
    for model in (a, b, c):
        model.train_step({"x": x})
    assert usage(a) > usage(b) > usage(c)


def test_once_annealed_out_the_departures_leave_the_step_which_is_then_the_papers(tmp_path):
    """From the epoch where their weights reach 0, a fit with every departure runs the very
    step of a model compiled without them: the same loss, the same weights, no departure
    value."""
    x = (np.random.default_rng(0).random((16, 5)) < 0.5).astype(np.float32)
    y = np.arange(16) % 2
    data = tf.data.Dataset.from_tensors({"x": x, "y_pseudo": y, "x_labelled": x[:4],
                                         "y_labelled": y[:4]}).repeat()
    with_terms, without = tiny_cagem(num_clusters=2), tiny_cagem(num_clusters=2)
    with_terms.compile(keras.optimizers.SGD(0.1), cluster_usage=True, pseudo_labels=True,
                       z2_code=True, labelled_elbo=True)
    without.compile(keras.optimizers.SGD(0.1))
    with_terms.schedule([schedules.Linear(w, start=1.0, epochs=1)
                         for w in ("usage_weight", "pseudo_weight", "code_weight",
                                   "labelled_elbo_weight")], steps_per_epoch=2)
    said = []
    history = with_terms.fit(data, epochs=3, steps_per_epoch=2, verbose=0,
                             callbacks=[callbacks.DropDepartures(1, said.append)])
    # The departures' values are logged for the first epoch only.
    assert len(history.history["h_pseudo"]) == len(history.history["h_z2_code"]) == 1
    assert len(history.history["h_labelled_elbo"]) == 1
    assert len(history.history["elbo"]) == 3 and len(said) == 1 and "epoch 2" in said[0]
    assert not with_terms.drop_departures()  # once
    # Both from the same weights on: one more epoch each.
    for va, vb in zip(with_terms.variables, without.variables):
        vb.assign(va)
    without.optimizer.iterations.assign(with_terms.optimizer.iterations)
    a = with_terms.fit(data, epochs=1, steps_per_epoch=2, verbose=0).history["loss"]
    b = without.fit(data, epochs=1, steps_per_epoch=2, verbose=0).history["loss"]
    assert a == pytest.approx(b, rel=1e-6)
    for va, vb in zip(with_terms.trainable_variables, without.trainable_variables):
        np.testing.assert_allclose(va.numpy(), vb.numpy(), atol=1e-6)


def _blobs(k: int):
    """100 k points in 5-d around k well separated centres; class n % k for point n."""
    rng = np.random.default_rng(2)
    truth = np.arange(100 * k) % k
    return rng.normal(0, 10, (k, 5))[truth] + rng.normal(0, 0.5, (100 * k, 5)), truth


def test_seeded_kmeans_gives_every_labelled_image_its_class_and_aligns_clusters_with_classes():
    x, truth = _blobs(3)
    labelled = np.arange(9)
    # A labelled point with a wrong class keeps it, as constrained k-means says.
    labels = truth[labelled].copy()
    labels[0] = 1
    clusters = clustering.seeded_kmeans(x, labelled, labels, 3)
    np.testing.assert_array_equal(clusters[labelled], labels)
    rest = np.setdiff1d(np.arange(300), labelled)
    assert np.mean(clusters[rest] == truth[rest]) == 1.0  # cluster c is class c, not a renaming
    np.testing.assert_array_equal(clusters, clustering.seeded_kmeans(x, labelled, labels, 3))
    with pytest.raises(ValueError, match="every class"):
        clustering.seeded_kmeans(x, labelled[:2], truth[:2], 3)


def test_matched_kmeans_names_plain_kmeans_clusters_after_the_classes_most_labels_agree_with():
    x, truth = _blobs(4)
    labelled = np.arange(12)
    labels = truth[labelled].copy()
    labels[0] = 2  # outvoted: its cluster is still named after class 0, it alone keeps class 2
    clusters = clustering.matched_kmeans(x, labelled, labels, 4, seed=5)
    np.testing.assert_array_equal(clusters[labelled], labels)
    rest = np.setdiff1d(np.arange(400), labelled)
    assert np.mean(clusters[rest] == truth[rest]) == 1.0
    # The partition is plain k-means' (the labels only name its clusters), the same per seed.
    np.testing.assert_array_equal(clusters[rest],
                                  clustering.matched_kmeans(x, labelled, labels, 4, seed=5)[rest])
    plain = clustering.kmeans(x, 4, seed=5)
    assert clustering.nmi(plain[rest], clusters[rest]) == pytest.approx(1.0)


def test_the_naming_of_clusters_is_the_assignment_with_the_most_agreeing_labels():
    rng = np.random.default_rng(0)
    for _ in range(200):
        k = int(rng.integers(1, 7))
        counts = rng.integers(0, 4, (k, k))
        naming = clustering._max_assignment(counts)
        assert sorted(naming) == list(range(k))
        best = max(sum(counts[i, p[i]] for i in range(k))
                   for p in itertools.permutations(range(k)))
        assert sum(counts[i, naming[i]] for i in range(k)) == best


def _changed(before, model):
    return {v.path for b, v in zip(before, model.trainable_variables)
            if not np.allclose(b, v.numpy(), atol=1e-7)}


def test_the_z2_code_departure_trains_only_q_z2_and_p_y_and_is_the_papers_step_at_weight_0():
    x = (np.random.default_rng(0).random((8, 5)) < 0.5).astype(np.float32)
    with_term, without = tiny_cagem(num_clusters=3), tiny_cagem(num_clusters=3)
    with_term.compile(keras.optimizers.SGD(0.1), z2_code=True)
    without.compile(keras.optimizers.SGD(0.1))
    assert float(with_term.code_weight) == 0.0  # what the anneal leaves
    out_a, out_b = with_term.train_step({"x": x}), without.train_step({"x": x})
    assert float(out_a["loss"]) == pytest.approx(float(out_b["loss"]))
    assert "h_z2_code" in out_a
    for va, vb in zip(with_term.trainable_variables, without.trainable_variables):
        np.testing.assert_allclose(va.numpy(), vb.numpy(), atol=1e-6)
    # The term's own gradient: a model whose ELBO gradient is zero (learning rate 0 for the
    # ELBO is not expressible, so compare one step with and without the weight).
    a, b = tiny_cagem(num_clusters=3), tiny_cagem(num_clusters=3)
    for m in (a, b):
        m.compile(keras.optimizers.SGD(0.1), z2_code=True)
    a.code_weight.assign(50.0)
    a.train_step({"x": x})
    b.train_step({"x": x})
    allowed = {v.path for v in a.code_variables}
    differ = {va.path for va, vb in zip(a.trainable_variables, b.trainable_variables)
              if not np.allclose(va.numpy(), vb.numpy(), atol=1e-6)}
    assert differ and differ <= allowed
    assert any(p.startswith("q_z2") for p in differ) and any(p.startswith("p_y") for p in differ)


def test_the_z2_code_is_the_cross_entropy_part_of_kl_y():
    model = tiny_cagem(num_clusters=3)
    x = (np.random.default_rng(0).random((8, 5)) < 0.5).astype(np.float32)
    terms = model.latent_terms(x, 2, seed=tf.constant([3, 4]))
    q = tf.nn.softmax(terms["q_y_logits"]).numpy()                       # [S,B,K]
    log_p = np.transpose(terms["log_p_y"].numpy(), [1, 2, 0])           # [S,B,K]
    entropy = -np.sum(q * np.log(q), -1)
    kl_y = objective.elbo(terms)["kl_y"].numpy()
    # kl_y = E_q[log q(y)] + E_q[-log p(y|z2^y)]: the second part is the code term.
    expected = np.mean(np.sum(q * -log_p, -1))
    assert float(objective.z2_code(terms)) == pytest.approx(expected, rel=1e-5)
    assert float(np.mean(kl_y)) == pytest.approx(np.mean(-entropy) + expected, rel=1e-4)


def test_a_beta_schedule_moves_alpha_to_the_papers_value_and_stays_there():
    model = tiny_cagem(num_clusters=2)
    ramp = schedules.Linear("label_weight", "alpha", start=50.0, epochs=4, end=10.0)
    assert ramp(0) == 50.0 and ramp(2) == pytest.approx(30.0)
    assert ramp(4) == 10.0 and ramp(40) == 10.0
    model.compile(keras.optimizers.SGD(0.1), alpha=10.0)
    assert float(model.label_weight) == 10.0  # without a schedule: alpha throughout
    x = (np.random.default_rng(0).random((8, 5)) < 0.5).astype(np.float32)
    data = {"x": x, "x_labelled": x[:4], "y_labelled": np.array([0, 1, 0, 1])}
    model.label_weight.assign(50.0)
    assert float(model.train_step(data)["alpha"]) == 50.0  # the step uses the scheduled value


def test_renaming_the_clusters_permutes_every_y_and_leaves_the_bounds_unchanged():
    # Shared noise: every branch y draws z2 with the same eps, whatever the names of y.
    model = tiny_cagem(num_clusters=3, z1_dim=2, z2_dim=2, shared_noise=True)
    model.compile(keras.optimizers.Adam(0.01))
    x = (np.random.default_rng(0).random((6, 5)) < 0.5).astype(np.float32)
    model.train_step({"x": x})  # Adam's moments are no longer zero
    seed = tf.constant([4, 5])
    q_before = model.class_log_probs(x, 4, seed=seed)[0].numpy()
    bound_before = model.iw_bound(x, 20, seed=seed).numpy()
    y = tf.one_hot([2, 0, 1, 2, 0, 1], 3)
    z1 = np.random.default_rng(1).normal(size=(6, 2)).astype(np.float32)
    z2 = z1[:, ::-1].copy()
    p_x_before = model.p_x.distribution([y, z1]).log_prob(x).numpy()
    p_z1_before = model.p_z1.distribution([y, z2]).log_prob(z1).numpy()
    q_z2_before = model.q_z2.distribution([y, z1, x]).log_prob(z2).numpy()
    p_y_before = model.p_y([z2]).numpy()
    q_y = model.q_y.heads[0]
    slot = model.optimizer._momentums[model.optimizer._get_variable_index(q_y.kernel)]
    slot_before = slot.numpy()
    order = np.array([2, 0, 1])  # class c <- cluster order[c]
    model.rename_clusters(order)
    q_after = model.class_log_probs(x, 4, seed=seed)[0].numpy()
    np.testing.assert_allclose(q_after, q_before[:, order], atol=1e-5)
    np.testing.assert_allclose(model.p_y([z2]).numpy(), p_y_before[:, order], atol=1e-5)
    # y = c now is the old y = order[c]: the same densities for the renamed values.
    renamed_y = tf.one_hot(np.argsort(order)[[2, 0, 1, 2, 0, 1]], 3)
    np.testing.assert_allclose(model.p_x.distribution([renamed_y, z1]).log_prob(x).numpy(),
                               p_x_before, atol=1e-5)
    np.testing.assert_allclose(model.p_z1.distribution([renamed_y, z2]).log_prob(z1).numpy(),
                               p_z1_before, atol=1e-5)
    np.testing.assert_allclose(
        model.q_z2.distribution([renamed_y, z1, x]).log_prob(z2).numpy(), q_z2_before,
        atol=1e-5)
    np.testing.assert_allclose(model.iw_bound(x, 20, seed=seed).numpy(), bound_before,
                               atol=1e-4)
    np.testing.assert_array_equal(slot.numpy(), slot_before[:, order])
    with pytest.raises(ValueError, match="not a permutation"):
        model.rename_clusters([0, 0, 1])


def test_labelled_responsibilities_name_each_class_after_the_cluster_holding_most_of_it():
    rng = np.random.default_rng(0)
    order = np.array([3, 1, 0, 2])  # class c is in cluster order[c]
    labels = np.repeat(np.arange(4), 3)
    q_y = np.full((12, 4), 0.05)
    q_y[np.arange(12), order[labels]] = 0.85
    q_y[0] = [0.05, 0.05, 0.85, 0.05]  # one image of class 0 in the wrong cluster
    q_y += rng.uniform(0, 0.01, q_y.shape)
    np.testing.assert_array_equal(clustering.name_by_labels(q_y, labels, 4), order)


def test_labels_late_keep_alpha_at_zero_until_the_naming_then_follow_the_beta_schedule():
    late = schedules.Linear("label_weight", start=30.0, epochs=2, end=10.0, begin=3)
    assert late(0) == 0.0 and late(2.99) == 0.0
    assert late(3) == 30.0 and late(4) == pytest.approx(20.0)
    assert late(5) == 10.0 and late(50) == 10.0
    constant = schedules.Linear("label_weight", start=10.0, epochs=0, end=10.0, begin=3)
    assert constant(2.5) == 0.0 and constant(3) == 10.0


def test_labels_late_name_the_clusters_once_at_the_end_of_the_departure():
    """`NameClusters` at epoch 2 renames the model once, before epoch 3 (also when a run
    resumes there), so that the labelled images' q(y|x) then favours their own classes; a
    run resumed after that epoch is not renamed again."""
    model = tiny_cagem(num_clusters=2, z1_dim=2)
    model.compile(keras.optimizers.SGD(0.05))
    x = (np.random.default_rng(0).random((16, 5)) < 0.5).astype(np.float32)
    data = tf.data.Dataset.from_tensors({"x": x}).repeat()
    model.fit(data, epochs=2, steps_per_epoch=1, verbose=0)
    q = model.class_log_probs(x[:4], seed=tf.constant([0, 0]))[0].numpy()
    labels = 1 - np.argmax(q, -1)  # every label names the other cluster
    said = []
    naming = callbacks.NameClusters(2, x[:4], labels, 2, seed=0, log=said.append)
    model.fit(data, initial_epoch=2, epochs=4, steps_per_epoch=1, verbose=0,
              callbacks=[naming])
    assert len(said) == 1 and "epoch 3" in said[0] and naming.order.tolist() == [1, 0]
    after = np.argmax(model.class_log_probs(x[:4], seed=tf.constant([0, 0]))[0], -1)
    assert (after == labels).mean() >= 0.75
    late = callbacks.NameClusters(2, x[:4], labels, 2, seed=0, log=said.append)
    model.fit(data, initial_epoch=4, epochs=5, steps_per_epoch=1, verbose=0, callbacks=[late])
    assert late.order is None and len(said) == 1


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_the_labelled_elbo_summed_over_y_by_q_with_its_entropy_is_the_unlabelled_elbo(temperature):
    """With one sample of z1, F(x) = sum_y q(y|z1,x) F(x,y) + T H(q(y|z1,x)) for the warmed-up
    objective: F(x,y) is the ELBO of x with y given, drawn from the same z1 and z2^y."""
    model = tiny_cagem(num_clusters=3)
    x = (np.random.default_rng(0).random((8, 5)) < 0.5).astype(np.float32)
    terms = model.latent_terms(x, 1, seed=tf.constant([3, 4]))
    per_y = np.stack([objective.labelled_elbo(terms, np.full(8, y), temperature).numpy()
                      for y in range(3)])                                        # [K,B]
    q = tf.nn.softmax(terms["q_y_logits"][0]).numpy().T                         # [K,B]
    entropy = -np.sum(q * np.log(q), axis=0)
    expected = np.sum(q * per_y, axis=0) + temperature * entropy
    np.testing.assert_allclose(objective.elbo(terms, temperature)["objective"].numpy(),
                               expected, rtol=1e-5, atol=1e-5)
    # Each example's own label picks its branch.
    labels = np.arange(8) % 3
    np.testing.assert_allclose(objective.labelled_elbo(terms, labels, temperature).numpy(),
                               per_y[labels, np.arange(8)], rtol=1e-6)


def test_the_labelled_elbo_departure_trains_every_network_but_q_y_and_is_the_papers_step_at_0():
    rng = np.random.default_rng(0)
    x = (rng.random((8, 5)) < 0.5).astype(np.float32)
    data = {"x": x, "x_labelled": x[:6], "y_labelled": np.arange(6) % 3}
    with_term, without = tiny_cagem(num_clusters=3), tiny_cagem(num_clusters=3)
    with_term.compile(keras.optimizers.SGD(0.1), alpha=1.0, labelled_elbo=True)
    without.compile(keras.optimizers.SGD(0.1), alpha=1.0)
    assert float(with_term.labelled_elbo_weight) == 0.0  # what the anneal leaves
    out_a, out_b = with_term.train_step(data), without.train_step(data)
    assert float(out_a["loss"]) == pytest.approx(float(out_b["loss"]))
    assert "h_labelled_elbo" in out_a and "h_labelled_elbo" not in out_b
    for va, vb in zip(with_term.trainable_variables, without.trainable_variables):
        np.testing.assert_allclose(va.numpy(), vb.numpy(), atol=1e-6)
    # At a large weight the term moves every network but q(y|z1,x), which it does not read.
    a, b = tiny_cagem(num_clusters=3), tiny_cagem(num_clusters=3)
    for m in (a, b):
        m.compile(keras.optimizers.SGD(0.1), alpha=1.0, labelled_elbo=True)
    a.labelled_elbo_weight.assign(50.0)
    a.train_step(data)
    b.train_step(data)
    differ = {va.path.split("/")[0] for va, vb in zip(a.trainable_variables,
                                                      b.trainable_variables)
              if not np.allclose(va.numpy(), vb.numpy(), atol=1e-6)}
    assert differ == {"q_z1", "q_z2", "p_y", "p_z1", "p_x"}
