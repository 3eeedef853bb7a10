"""A complete, resumable CaGeM training run: data, model, callbacks, checkpoints and exports.

`train(config)` takes the settings of `train/main.py` as a dict (the keys of DEFAULTS).
"""

import os

import keras
import tensorflow as tf

from cagem_tf import callbacks, clustering, data, objective, rundir
from cagem_tf.model import CaGeM

DEFAULTS = dict(
    dataset="mnist", labels=0, clusters=0, epochs=1000, batch_size=100, labelled_batch_size=100,
    beta=0.1, learning_rate=1e-3, lr_decay=0.75, lr_decay_epochs=50, warmup_epochs=100,
    z1_dim=64, z2_dim=32, hidden_lower=[1024, 1024], hidden_upper=[512, 512],
    skip_connection=True, num_samples=1, seed=0, model_dir="runs/cagem", data_dir=None,
    manual_dir=None, validation=0, test_binarization="fixed", eval_every=10,
    eval_iw_samples=100, eval_subset=1000, export_every=0, keep_checkpoints=3,
    strategy="default", fresh=False, verbose=1, clip_norm=0.0, y_init_stddev=0.0,
    shared_noise=False, cluster_usage=0.0, pseudo_labels=0.0, departure_epochs=5)
# Settings that may differ when a run is resumed: they do not change what is being trained.
MAY_CHANGE = ("epochs", "eval_every", "eval_iw_samples", "eval_subset", "export_every",
              "keep_checkpoints", "data_dir", "manual_dir", "strategy", "fresh", "verbose",
              "model_dir")
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
LABELLED_INDICES = "labelled_indices.json"
MODEL_CONFIG = "model.json"


class TrainingError(RuntimeError):
    """Training stopped; the message says why and what was kept."""


def make_strategy(name: str) -> tf.distribute.Strategy:
    """default: one device; mirrored: all local GPUs (or CPUs); multi_worker: TF_CONFIG's
    cluster; tpu: the TPU the cluster resolver finds."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise rundir.RunError("--strategy multi_worker needs the TF_CONFIG environment "
                                  "variable describing the cluster")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, tf.errors.OpError) as e:
            raise rundir.RunError(f"--strategy tpu: no TPU found ({e}); use --strategy default")
        return tf.distribute.TPUStrategy(resolver)
    raise rundir.RunError(f"--strategy {name}: use one of {', '.join(STRATEGIES)}")


def build_model(config: dict, image_shape, num_clusters: int, alpha: float,
                synchronized_bn: bool = False) -> CaGeM:
    """The CaGeM of `config`, compiled with Adam at the configured learning rate."""
    model = CaGeM(image_shape=image_shape, num_clusters=num_clusters, z1_dim=config["z1_dim"],
                  z2_dim=config["z2_dim"], hidden_lower=config["hidden_lower"],
                  hidden_upper=config["hidden_upper"],
                  skip_connection=config["skip_connection"], num_samples=config["num_samples"],
                  seed=config["seed"], synchronized_bn=synchronized_bn,
                  y_init_stddev=config["y_init_stddev"], shared_noise=config["shared_noise"])
    clip = {"global_clipnorm": config["clip_norm"]} if config["clip_norm"] > 0 else {}
    model.compile(keras.optimizers.Adam(config["learning_rate"], **clip), alpha=alpha,
                  cluster_usage=config["cluster_usage"] > 0,
                  pseudo_labels=config["pseudo_labels"] > 0)
    return model


def load_trained(model_dir: str, checkpoint: str | None = None) -> CaGeM:
    """The model of a run directory with the weights of `checkpoint` (default: the latest)."""
    path = os.path.join(model_dir, MODEL_CONFIG)
    if not os.path.isfile(path):
        raise rundir.RunError(f"{model_dir}: no {MODEL_CONFIG}; is it a run directory of "
                              "train/main.py?")
    checkpoint = checkpoint or tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    if not checkpoint or not tf.io.gfile.glob(checkpoint + ".index"):
        raise rundir.RunError(f"{model_dir}: checkpoint {checkpoint or '(none yet)'} not found; "
                              "train at least one epoch or pass an existing --checkpoint")
    model = CaGeM(**rundir.read_json(path))
    try:
        callbacks.model_checkpoint(model).restore(checkpoint).expect_partial() \
            .assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as e:
        raise rundir.RunError(f"{checkpoint} does not hold the variables of the model in "
                              f"{path} ({type(e).__name__}); was it written by another "
                              "version or run?") from None
    return model


def evaluation_images(model_dir: str, subset: int = 0, split: str = "test", log=print):
    """(config, x, y) of a run: the first `subset` images (0: all) of its test split or of its
    --validation hold-out, binarized once with the run's seed, as every evaluation scores them."""
    config_path = os.path.join(model_dir, rundir.CONFIG)
    if not os.path.isfile(config_path):
        raise rundir.RunError(f"{model_dir}: no {rundir.CONFIG}; is it a run directory?")
    config = rundir.read_json(config_path)
    arrays = data.load(config["dataset"], config.get("data_dir"), config.get("manual_dir"),
                       log=log)
    if split == "validation":
        if not config.get("validation"):
            raise rundir.RunError(f"{model_dir} was trained without --validation")
        arrays = data.hold_out(arrays, config["validation"], config["seed"])
    n = min(subset or len(arrays.x_test), len(arrays.x_test))
    return config, data.binarize_once(arrays.x_test[:n], config["seed"]), arrays.y_test[:n]


def _labelled_subset(arrays, config, resuming, path):
    """The labelled indices of the run, checked against those saved when it began."""
    labelled = data.labelled_indices(arrays.y_train, config["labels"], arrays.num_classes,
                                     config["seed"])
    if resuming and os.path.isfile(path):
        if rundir.read_json(path) != labelled.tolist():
            raise rundir.RunError(f"{path} differs from the subset that --seed selects now (the "
                                  "data set changed?); add --fresh to start over")
    else:
        rundir.write_json(path, labelled.tolist())
    return labelled


def check_config(config: dict) -> None:
    """One-line errors for settings no run can use."""
    positive = ("epochs", "batch_size", "labelled_batch_size", "z1_dim", "z2_dim", "num_samples",
                "lr_decay_epochs", "keep_checkpoints")
    for key in positive:
        if config[key] < 1:
            raise rundir.RunError(f"--{key} {config[key]}: must be at least 1")
    for key in ("warmup_epochs", "eval_every", "eval_iw_samples", "eval_subset", "export_every",
                "validation", "clusters", "clip_norm", "y_init_stddev", "cluster_usage",
                "pseudo_labels", "departure_epochs"):
        if config[key] < 0:
            raise rundir.RunError(f"--{key} {config[key]}: must be 0 or more")
    if not config["learning_rate"] > 0 or not 0 < config["lr_decay"] <= 1:
        raise rundir.RunError("--learning_rate must be > 0 and --lr_decay in (0, 1]")
    if not config["beta"] >= 0:
        raise rundir.RunError(f"--beta {config['beta']}: must be >= 0")
    for key in ("hidden_lower", "hidden_upper"):
        if not config[key] or min(config[key]) < 1:
            raise rundir.RunError(f"--{key} {config[key]}: give one or more positive widths")
    if config["strategy"] not in STRATEGIES:
        raise rundir.RunError(f"--strategy {config['strategy']}: use one of "
                              f"{', '.join(STRATEGIES)}")


def train(config: dict, log=print, exporter=None) -> dict:
    """Trains (or resumes) the run in config["model_dir"]; returns the last epoch's logs.

    exporter(model, export_dir) -> path, when given, writes a SavedModel into
    <model_dir>/export every `export_every` epochs and at the end.

    Raises data.DataError, rundir.RunError for bad input (before anything is written) and
    TrainingError when the loss turns NaN or inf.
    """
    config = {**DEFAULTS, **config}
    check_config(config)
    arrays = data.load(config["dataset"], config["data_dir"], config["manual_dir"], log=log)
    arrays = data.hold_out(arrays, config["validation"], config["seed"])
    clusters = config["clusters"] or arrays.num_classes
    if config["labels"] and clusters != arrays.num_classes:
        raise rundir.RunError(f"--clusters {clusters}: with labels, the clusters are the "
                              f"{arrays.num_classes} classes; leave --clusters at 0")
    data.labelled_indices(arrays.y_train, config["labels"], arrays.num_classes, config["seed"])
    strategy = make_strategy(config["strategy"])

    model_dir = config["model_dir"]
    resuming = rundir.prepare(model_dir, config, config["fresh"], MAY_CHANGE, log=log)
    labelled = _labelled_subset(arrays, config, resuming, os.path.join(model_dir,
                                                                        LABELLED_INDICES))
    pseudo = None
    if config["pseudo_labels"] > 0:
        log(f"k-means ({clusters} centres) of the training images for --pseudo_labels")
        pseudo = clustering.kmeans(arrays.x_train / 255.0, clusters, config["seed"])
    streams = data.streams(arrays, labelled, config["batch_size"],
                           config["labelled_batch_size"], config["seed"],
                           test_binarization=config["test_binarization"], pseudo_labels=pseudo)
    alpha = objective.alpha(config["beta"], streams.num_unlabelled, streams.num_labelled)
    with strategy.scope():
        model = build_model(config, arrays.image_shape, clusters, alpha,
                            synchronized_bn=strategy.num_replicas_in_sync > 1)
        checkpoint = callbacks.EpochCheckpoint(os.path.join(model_dir, "checkpoints"), model,
                                               keep=config["keep_checkpoints"])
        initial_epoch = checkpoint.restore()
    model_config = {k: v for k, v in model.get_config().items() if k != "synchronized_bn"}
    rundir.write_json(os.path.join(model_dir, MODEL_CONFIG), model_config)
    if initial_epoch:
        log(f"Resuming {model_dir} after epoch {initial_epoch}")
    if initial_epoch >= config["epochs"]:
        log(f"{model_dir} has trained {initial_epoch} epochs already (--epochs "
            f"{config['epochs']}); raise --epochs to train on")

    n_eval = min(config["eval_subset"], len(arrays.x_test))
    x_eval = data.binarize_once(arrays.x_test[:n_eval], config["seed"])
    log_dir = os.path.join(model_dir, "logs")
    schedule = callbacks.step_decay(config["learning_rate"], config["lr_decay"],
                                    config["lr_decay_epochs"])
    fit_callbacks = [
        callbacks.KLWarmup(config["warmup_epochs"]),
        keras.callbacks.LearningRateScheduler(schedule),
        callbacks.Anneal("usage_weight", config["cluster_usage"], config["departure_epochs"]),
        callbacks.Anneal("pseudo_weight", config["pseudo_labels"], config["departure_epochs"]),
        keras.callbacks.TerminateOnNaN(),
        checkpoint,
        keras.callbacks.TensorBoard(log_dir, write_graph=False, update_freq="epoch"),
    ]
    if n_eval:
        fit_callbacks.append(callbacks.Summaries(
            log_dir, x_eval, arrays.y_test[:n_eval], config["eval_every"],
            config["eval_iw_samples"], config["epochs"], report_errors=bool(config["labels"]),
            seed=config["seed"], log=log))
    export_dir = os.path.join(model_dir, "export")
    if exporter and config["export_every"]:
        fit_callbacks.append(callbacks.PeriodicExport(exporter, export_dir,
                                                      config["export_every"], checkpoint, log))
    history = model.fit(streams.train, epochs=config["epochs"], initial_epoch=initial_epoch,
                        callbacks=fit_callbacks, verbose=config["verbose"])
    if checkpoint.bad_epoch is not None:
        kept = checkpoint.manager.latest_checkpoint or "none yet"
        raise TrainingError(f"the loss became NaN or inf in epoch {checkpoint.bad_epoch + 1}; "
                            f"training stopped and the last good checkpoint is kept ({kept}); "
                            "rerun to resume from it, or add --fresh with a lower "
                            "--learning_rate to start over")
    every = config["export_every"]
    if exporter and initial_epoch < config["epochs"] and not (
            every and config["epochs"] % every == 0):
        log(f"exported {exporter(model, export_dir)}")
    return {k: v[-1] for k, v in history.history.items()} if history.history else {}
