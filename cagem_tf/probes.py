"""What the latents tell of the class: probes, and p(y|z2) refitted alone.

The paper's cascade p(y|x) = E_q(z2|x)[p(y|z2)] reads the class from draws
z2 ~ q(z2|x,c,z1). Two questions separate why it can lag q(y|x): does p(y|z2) read its
input badly, or does a draw of z2 carry little of the class? Codes of images x:
  "mean"  z1* = E_q(z1|x)[z1],  c* = argmax_c q(c|z1*,x),  z2 = E_q(z2|x,c*,z1*)[z2]
  "draw"  z1 ~ q(z1|x),  c ~ q(c|z1,x),  z2 ~ q(z2|x,c,z1)  (what p(y|z2) sees in the ELBO)
A probe is a classifier (softmax regression, or one hidden ReLU layer) fitted to the codes of
training images with all their labels and scored on test images: a reference for what a
network of its size, given labels the model never saw and a short fit, reads from those codes
(not a bound: p(y|z2), fitted to many more draws, can read them better). A probe on draws
against one on means says how much the draw's noise hides; p(y|z2) at a draw against a probe
on draws, whether p(y|z2) reads what is there.

`refit_p_y` trains p(y|z2) alone on the ELBO, every other network fixed: the paper's
objective's unlabelled part, maximised over theta_y only, so what it gains is how far p(y|z2)
was from its optimum given the rest.
"""

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from cagem_tf import data, evaluation, rundir

CODES = ("mean", "draw")


def codes(model, x, kind: str, seed: int = 0, batch_size: int = 500) -> dict:
    """Codes of images x [N,...] (`kind`: see the module docstring) and p(y|z2) at them:
    {"z1": [N,d1], "z2": [N,d2], "c": [N] (the cluster z2 was drawn for), "p_y": [N,K]}.
    Only the inference networks on the way to z2 run, and q(z2|x,c,z1) for that c alone."""
    if kind not in CODES:
        raise ValueError(f"kind {kind!r}: use one of {', '.join(CODES)}")
    mean = kind == "mean"
    out = {"z1": [], "z2": [], "c": [], "p_y": []}
    for index, start in enumerate(range(0, len(x), batch_size)):
        xb = model.flatten(x[start:start + batch_size])
        seed_z1, seed_c, seed_z2 = tfp.random.split_seed(tf.constant([seed, index]), n=3)
        q_z1 = model.q_z1.distribution([xb])                                     # batch [B]
        z1 = q_z1.mean() if mean else q_z1.sample(seed=seed_z1)                  # [B,d1]
        logits = model.q_y([z1, xb])                                              # [B,K]
        c = (tf.argmax(logits, -1, output_type=tf.int32) if mean else
             tf.random.stateless_categorical(logits, 1, seed_c, dtype=tf.int32)[:, 0])
        q_z2 = model.q_z2.distribution(model.q_z2_inputs(
            tf.one_hot(c, model.num_clusters), z1, xb))                           # batch [B]
        z2 = q_z2.mean() if mean else q_z2.sample(seed=seed_z2)                  # [B,d2]
        for key, value in (("z1", z1), ("z2", z2), ("c", c),
                           ("p_y", tf.nn.softmax(model.p_y([z2])))):
            out[key].append(value.numpy())
    return {key: np.concatenate(values) for key, values in out.items()}


def probe_error(train_codes, train_labels, test_codes, test_labels, num_classes: int,
                hidden: int = 0, steps: int = 2000, seed: int = 0) -> float:
    """Test error of a classifier fitted to (train_codes [N,d], train_labels [N]): softmax
    regression (`hidden` 0) or one ReLU layer of `hidden` units, on codes standardised with
    the training codes' moments; `steps` steps of Adam on batches of 256, the order and
    the initial weights from `seed`."""
    mean, scale = train_codes.mean(0), train_codes.std(0) + 1e-6
    init = lambda i: keras.initializers.GlorotUniform(seed=seed + i)
    layers = [keras.layers.Dense(hidden, "relu", kernel_initializer=init(1))] if hidden else []
    net = keras.Sequential(layers + [keras.layers.Dense(num_classes, kernel_initializer=init(2))])
    net.compile(keras.optimizers.Adam(1e-3),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    batches = tf.data.Dataset.from_tensor_slices(
        (((train_codes - mean) / scale).astype(np.float32), np.asarray(train_labels))
    ).shuffle(len(train_codes), seed=seed).repeat().batch(256)
    net.fit(batches, steps_per_epoch=steps, epochs=1, verbose=0)
    logits = net((test_codes - mean) / scale, training=False).numpy()
    return float(np.mean(np.argmax(logits, -1) != np.asarray(test_labels)))


def refit_p_y(model, images, steps: int, learning_rate: float = 1e-3, batch_size: int = 100,
              seed: int = 0, likelihood: str = "bernoulli") -> None:
    """Trains p(y|z2)'s variables alone for `steps` steps of Adam on -mean ELBO over batches of
    `images` (uint8 [N,...], drawn with replacement, each batch observed anew as in training);
    batch norm with its moving statistics everywhere (every other network is fixed)."""
    variables = model.p_y.trainable_variables
    optimizer = keras.optimizers.Adam(learning_rate)

    @tf.function
    def step(x, step_seed):
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(model.elbo(x, 1, seed=step_seed)["elbo"])
        optimizer.apply(tape.gradient(loss, variables), variables)

    rng = np.random.default_rng(seed)
    for i in range(steps):
        batch = images[rng.integers(0, len(images), batch_size)]
        step(data.observed(batch, likelihood, seed + 1 + i), tf.constant([seed, i]))


def _errors(model, x, y, seed) -> dict:
    """The cascade's and q(y|x)'s errors (`evaluation.cluster_probs`) and the mean ELBO of one
    fixed draw, on images x with labels y."""
    p_y, q_y = evaluation.cluster_probs(model, x, seed)
    elbo = np.mean(np.concatenate([model.elbo(x[s:s + 500], 1, seed=[seed, s])["elbo"].numpy()
                                   for s in range(0, len(x), 500)]))
    return {"error_cascade": float(np.mean(np.argmax(p_y, -1) != y)),
            "error_q": float(np.mean(np.argmax(q_y, -1) != y)), "elbo": float(elbo)}


def study(model_dir: str, train_images: int = 20000, test_images: int = 1000, draws: int = 3,
          hidden: int = 256, probe_steps: int = 2000, refit_steps: int = 0, seed: int = 0,
          log=print) -> dict:
    """The cascade's diagnosis on a run trained with labels (K = the classes): the errors of
    the cascade, of q(y|x) and of p(y|z2) at one code; probes (softmax regression and `hidden`
    units, `probe_steps` steps each) on mean codes of z1 and z2 and on `draws` draws of z2 per
    training image; with `refit_steps`, the cascade and the ELBO (on the test images) after
    `refit_p_y` (of the model in memory: nothing in the run directory changes)."""
    model = rundir.load_model(model_dir)
    config, x_test, y_test, num_classes = rundir.evaluation_images(model_dir, test_images,
                                                                   log=lambda m: None)
    if not config.labels or model.num_clusters != num_classes:
        raise rundir.RunError(f"{model_dir} was trained without labels, so its clusters are "
                              "not the classes; the cascade's diagnosis needs a run trained "
                              "with --labels")
    arrays = data.load(config.dataset, config.data_dir, config.manual_dir, log=lambda m: None)
    raw_train, y_train = arrays.x_train[:train_images], arrays.y_train[:train_images]
    x_train = data.observed(raw_train, config.likelihood, config.seed)
    log(f"{model_dir}: {len(x_train)} training and {len(x_test)} test images")
    results = {"train_images": len(x_train), "test_images": len(x_test), "hidden": hidden,
               "draws": draws, "classifier_samples": model.spec.classifier_samples,
               **_errors(model, x_test, y_test, seed)}
    train = {"mean": codes(model, x_train, "mean", seed)}
    test = {"mean": codes(model, x_test, "mean", seed), "draw": codes(model, x_test, "draw", seed)}
    drawn = [codes(model, x_train, "draw", seed + 1 + d) for d in range(draws)]
    train["draw"] = {"z2": np.concatenate([d["z2"] for d in drawn])}
    train_labels = {"mean": y_train, "draw": np.tile(y_train, draws)}
    for kind in CODES:
        results[f"error_p_y_{kind}"] = float(np.mean(np.argmax(test[kind]["p_y"], -1) != y_test))
    probes = {}
    for kind, latent in (("mean", "z1"), ("mean", "z2"), ("draw", "z2")):
        for units in (0, hidden):
            probes[f"{latent}_{kind}_{units}"] = probe_error(
                train[kind][latent], train_labels[kind], test[kind][latent], y_test,
                num_classes, units, probe_steps, seed)
            log(f"probe {latent} {kind} {units}: {probes[f'{latent}_{kind}_{units}']:.3f}")
    results["probes"] = probes
    if refit_steps:
        refit_p_y(model, arrays.x_train, refit_steps, seed=seed, likelihood=config.likelihood)
        results["refit_steps"] = refit_steps
        results["refit"] = _errors(model, x_test, y_test, seed)
    return results


def markdown(results) -> str:
    """`study`'s results as Markdown: one table of test errors."""
    h, s = results["hidden"], results["classifier_samples"]
    probes = results["probes"]
    rows = [
        (f"q(y\\|x) ({s} draws of z1)", results["error_q"]),
        (f"the cascade p(y\\|x) ({s} draws of z1, a z2 per class)", results["error_cascade"]),
        ("p(y\\|z2) at the mean code", results["error_p_y_mean"]),
        ("p(y\\|z2) at one draw", results["error_p_y_draw"]),
        ("probe, softmax regression, z1 mean", probes["z1_mean_0"]),
        (f"probe, {h} hidden units, z1 mean", probes[f"z1_mean_{h}"]),
        ("probe, softmax regression, z2 mean", probes["z2_mean_0"]),
        (f"probe, {h} hidden units, z2 mean", probes[f"z2_mean_{h}"]),
        ("probe, softmax regression, z2 draw", probes["z2_draw_0"]),
        (f"probe, {h} hidden units, z2 draw", probes[f"z2_draw_{h}"]),
    ]
    lines = [f"{results['test_images']} test images; probes fitted to {results['train_images']} "
             f"training images with all their labels ({results['draws']} draws each for the "
             "draw codes)", "", "| classifier | test error |", "|---|---|"]
    lines += [f"| {name} | {value:.1%} |" for name, value in rows]
    if "refit" in results:
        refit = results["refit"]
        lines += ["", f"p(y\\|z2) refitted alone on the ELBO, {results['refit_steps']} steps: "
                  f"cascade {results['error_cascade']:.1%} -> {refit['error_cascade']:.1%}, "
                  f"test ELBO (one draw) {results['elbo']:.2f} -> {refit['elbo']:.2f} nats"]
    return "\n".join(lines)
