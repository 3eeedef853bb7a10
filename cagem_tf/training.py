"""A complete, resumable CaGeM training run: data, model, callbacks, checkpoints and exports.

`train(config)` takes a `Config` and trains (or resumes) the run in config.model_dir; the run
directory's layout is `cagem_tf.rundir`'s.
"""

import os
import re
import sys
import warnings

import keras
import numpy as np
import tensorflow as tf

from cagem_tf import (callbacks, clustering, cpu, data, files, objective, optimizer, rundir,
                      schedules, serving)
from cagem_tf.config import MAY_CHANGE, Config, ConfigError
from cagem_tf.files import UserError
from cagem_tf.model import CaGeM


class TrainingError(UserError, RuntimeError):
    """Training stopped; the message says why and what was kept."""


def make_strategy(name: str, collective_timeout: int = 0) -> tf.distribute.Strategy:
    """default: one device; mirrored: all local GPUs (or CPUs); multi_worker: TF_CONFIG's
    cluster, whose collectives give up after `collective_timeout` seconds (0: never; the
    coordination service's heartbeats find a dead worker and abort the others' collectives);
    tpu: the TPU the cluster resolver finds. (`Config` has checked the name.)"""
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ConfigError("--strategy multi_worker needs the TF_CONFIG environment "
                                  "variable describing the cluster")
        options = tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=collective_timeout or None)
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, tf.errors.OpError) as e:
            raise ConfigError(f"--strategy tpu: no TPU found ({e}); use --strategy default")
        return tf.distribute.TPUStrategy(resolver)
    return tf.distribute.get_strategy()


def build_model(config: Config, image_shape, num_clusters: int, alpha: float,
                synchronized_bn: bool = False) -> CaGeM:
    """The CaGeM of `config`, compiled with Adam at the configured learning rate."""
    model = CaGeM(config.spec(), image_shape, num_clusters, seed=config.seed,
                  synchronized_bn=synchronized_bn)
    clip = {"global_clipnorm": config.clip_norm} if config.clip_norm > 0 else {}
    # Keras' loop of several steps per call fails under MultiWorkerMirroredStrategy (a
    # placeholder in its while loop is not fed; Keras 3.15, TensorFlow 2.21).
    steps = 1 if config.strategy == "multi_worker" else config.steps_per_execution
    model.compile(optimizer.Adam(config.learning_rate, **clip), alpha=alpha,
                  steps_per_execution=steps,
                  cluster_usage=config.cluster_usage > 0,
                  pseudo_labels=config.pseudo_labels > 0, z2_code=config.z2_code > 0,
                  labelled_elbo=config.labelled_elbo > 0)
    return model


def _keep_labelled_subset(labelled, run: rundir.RunDir, resuming: bool) -> None:
    """Saves the run's labelled indices, or checks them against those saved when it began."""
    if resuming and os.path.isfile(run.labelled):
        if files.read_json(run.labelled) != labelled.tolist():
            raise rundir.RunError(f"{run.labelled} differs from the subset that --seed (or "
                                  "--labels_seed) selects now (the data set changed?); add "
                                  "--fresh to start over")
    else:
        files.write_json(run.labelled, labelled.tolist())


def weight_schedules(config: Config, alpha: float) -> list:
    """The schedules of the model's scalar weights (`cagem_tf.schedules`): the KL warm-up, the
    departures' anneals to 0 and, with --beta_start, alpha's move to its value `alpha` (with
    labels late, alpha is 0 until the departure ends and the move starts there)."""
    epochs = config.departure_epochs
    moved = [schedules.Linear("temperature", start=0.0, epochs=config.warmup_epochs, end=1.0),
             schedules.Linear("usage_weight", start=config.cluster_usage, epochs=epochs),
             schedules.Linear("pseudo_weight", start=config.pseudo_labels, epochs=epochs),
             schedules.Linear("code_weight", start=config.z2_code, epochs=epochs),
             schedules.Linear("labelled_elbo_weight", start=config.labelled_elbo,
                               epochs=epochs)]
    # "unsupervised" naming: no labelled term until the departure ends, then beta's schedule.
    begin = epochs if config.labels_late else 0
    if config.beta_start or begin:
        start = config.beta_start or config.beta
        moved.append(schedules.Linear(
            "label_weight", "alpha", start=alpha * start / config.beta,
            epochs=config.beta_epochs if config.beta_start else 0, end=alpha, begin=begin))
    return moved


def _callbacks(config: Config, run: rundir.RunDir, model, checkpoint, stop, arrays, labelled,
               log, chief=True):
    """Learning-rate decay, the departures' end, NaN stop, checkpoints; on the chief also
    TensorBoard summaries (training, periodic evaluation, settings) and periodic exports."""
    decay = callbacks.step_decay(config.learning_rate, config.lr_decay, config.lr_decay_epochs)
    fit_callbacks = [stop, keras.callbacks.LearningRateScheduler(decay),
                     keras.callbacks.TerminateOnNaN(), checkpoint]
    if config.departures:
        fit_callbacks.insert(1, callbacks.DropDepartures(config.departure_epochs,
                                                         log if chief else None))
    if config.labels_late:
        fit_callbacks.insert(1, callbacks.NameClusters(
            config.departure_epochs,
            data.observed(arrays.x_train[labelled], config.likelihood, config.seed),
            arrays.y_train[labelled], arrays.num_classes, config.seed, log))
    if not chief:
        return fit_callbacks
    n_eval = min(config.eval_subset, len(arrays.x_test))
    hparams = {k: (v if isinstance(v, (bool, int, float, str)) else str(v))
               for k, v in config.to_dict().items() if k not in MAY_CHANGE}
    fit_callbacks.append(callbacks.Summaries(
        run, data.observed(arrays.x_test[:n_eval], config.likelihood, config.seed),
        arrays.y_test[:n_eval],
        arrays.num_classes, config.eval_every if n_eval else 0, config.eval_iw_samples,
        config.epochs, report_errors=bool(config.labels), seed=config.seed, log=log,
        hparams=hparams, stop=stop))
    if config.export_every > 0:
        fit_callbacks.append(callbacks.PeriodicExport(run.export, config.export_every,
                                                      checkpoint, config.keep_exports,
                                                      config.export_iw_samples, log))
    return fit_callbacks


def plan(config: Config, arrays, streams, model, initial_epoch: int) -> list[str]:
    """What the run will do, said before it starts."""
    steps = streams.steps_per_epoch
    run = rundir.RunDir(config.model_dir)
    lines = [f"{arrays.name}: {len(arrays.x_train)} training images ({streams.num_labelled} "
             f"labelled), {len(arrays.x_test)} evaluation images, {arrays.image_shape}; "
             f"K = {model.num_clusters} clusters; {model.count_params():,} parameters "
             f"(hidden {config.hidden_lower}/{config.hidden_upper})",
             f"epochs {initial_epoch + 1}..{config.epochs} of {steps} steps "
             f"(batch {config.batch_size}; {model.steps_per_execution} per call of the "
             f"compiled step); run directory {run.path}",
             f"CPU: {cpu.model_name()}, {cpu.cores()} cores; threads per op "
             f"{tf.config.threading.get_intra_op_parallelism_threads() or 'TensorFlow default'}"
             f", ops at once "
             f"{tf.config.threading.get_inter_op_parallelism_threads() or 'TensorFlow default'}",
             f"TensorBoard: tensorboard --logdir {run.logs()}"]
    if not tf.config.list_physical_devices("GPU") and config.epochs - initial_epoch > 100:
        # The time itself is measured: each epoch's line gives the expected end.
        lines.append(f"no GPU: {config.epochs - initial_epoch} epochs on a CPU take many hours "
                     "(each epoch's line below says when the run will end); the quick start "
                     "(--flagfile experiments/quickstart.flags) and the CPU protocol "
                     "(experiments/cpu_*.flags) train in minutes")
    return lines


def train(config: Config, log=print) -> dict:
    """Trains (or resumes) the run in config.model_dir; returns the last epoch's logs.

    A SavedModel goes to <model_dir>/export every `export_every` epochs and at the end (none
    when it is -1).
    Sets the process's global seeds (Python, NumPy, TensorFlow, Keras) to config.seed.
    Raises data.DataError, rundir.RunError for bad input (before anything is written) and
    TrainingError when the loss turns NaN or inf.
    """
    warning = cpu.precision_warning(config.precision)
    if warning:
        log(warning)
    arrays = data.load(config.dataset, config.data_dir, config.manual_dir, log=log)
    arrays = data.hold_out(arrays, config.validation, config.seed)
    clusters = config.clusters or arrays.num_classes
    if config.labels and clusters != arrays.num_classes:
        raise ConfigError(f"--clusters {clusters}: with labels, the clusters are the "
                              f"{arrays.num_classes} classes; leave --clusters at 0")
    labelled = data.labelled_indices(arrays.y_train, config.labels, arrays.num_classes,
                                     config.subset_seed)
    strategy = make_strategy(config.strategy, config.collective_timeout)

    if not is_chief(strategy):
        return _train(config, arrays, labelled, clusters, strategy, log, chief=False)
    if config.fresh:
        rundir.set_aside(config.model_dir, log)
    with files.Lock(config.model_dir, "training"):
        return _train(config, arrays, labelled, clusters, strategy, log)


def _worker_failure(error, checkpoint) -> str:
    """One line for a multi-worker step that failed because another worker did."""
    lines = str(error).splitlines()
    # The coordination service names the dead task on a line of its own; a collective that
    # lost its peer first names it as gRPC's "remote target".
    dead = [l.strip() for l in lines if l.strip().startswith("/job:")] + \
        re.findall(r"remote target (/job:[^/\s]+/replica:\d+/task:\d+)", str(error))
    reason = f"worker {dead[0]} stopped" if dead else \
        f"a collective failed ({type(error).__name__}: {lines[0][:120] if lines else ''})"
    kept = checkpoint.manager.latest_checkpoint or "none yet"
    return (f"{reason}; the job stopped and the chief's last checkpoint is kept ({kept}): "
            "start every worker again with the same command to resume")


def is_chief(strategy) -> bool:
    """Whether this process writes the run directory: always, except for the workers of a
    multi-worker cluster other than its chief (the task "chief", or worker 0 when the cluster
    has no chief task), as tf.distribute's multi-worker guide has it."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and \
        "chief" not in resolver.cluster_spec().as_dict()


def _train(config: Config, arrays, labelled, clusters: int, strategy, log,
           chief: bool = True) -> dict:
    """The part of `train` that writes into the run directory, under its lock. A non-chief
    worker writes nothing there but its checkpoint shards, to a temporary folder it removes
    (saving is collective: every worker takes part); it restores from the chief's
    checkpoints, so the run directory must be on storage every worker sees."""
    run = rundir.RunDir(config.model_dir)
    if chief:
        _keep_labelled_subset(labelled, run, rundir.prepare(config, log=log))
    pseudo = None
    if config.pseudo_labels > 0:
        x = arrays.x_train / np.float32(255)
        if not len(labelled) or config.labels_late:
            log(f"k-means ({clusters} centres) of the training images for --pseudo_labels")
            pseudo = clustering.kmeans(x, clusters, config.seed)
        else:
            log(f"k-means {config.pseudo_kmeans} by the {len(labelled)} labelled images for "
                "--pseudo_labels")
            classes = arrays.y_train[labelled]
            pseudo = (clustering.matched_kmeans(x, labelled, classes, clusters, config.seed)
                      if config.pseudo_kmeans == "matched" else
                      clustering.seeded_kmeans(x, labelled, classes, clusters))
    # The global seeds (TensorFlow's enters tf.data's shuffles; Keras draws the initial weights'
    # seeds from Python's random) are set here, after the data are loaded: preparing a tfds
    # data set draws from Python's random, and one seed must repeat a run whether or not its
    # data set was prepared first, in a new process or the same one.
    keras.utils.set_random_seed(config.seed)
    streams = data.streams(arrays, labelled, config.batch_size, config.labelled_batch_size,
                           config.seed, pseudo_labels=pseudo, likelihood=config.likelihood)
    alpha = objective.alpha(config.beta, streams.num_unlabelled, streams.num_labelled)
    with strategy.scope():
        model = build_model(config, arrays.image_shape, clusters, alpha,
                            synchronized_bn=strategy.num_replicas_in_sync > 1)
        scratch = None if chief else run.join(
            f".worker-{strategy.cluster_resolver.task_id}-scratch")
        stop = callbacks.GracefulStop()
        checkpoint = callbacks.EpochCheckpoint(run.checkpoints, model,
                                               keep=config.keep_checkpoints, log=log,
                                               scratch=scratch, stop=stop)
        initial_epoch = checkpoint.restore()
    model.schedule(weight_schedules(config, alpha), streams.steps_per_epoch)
    if chief:
        files.write_json(run.model, {k: v for k, v in model.get_config().items()
                                      if k != "synchronized_bn"})
    if initial_epoch:
        log(f"Resuming {run.path} after epoch {initial_epoch}")
    if initial_epoch >= config.epochs:
        log(f"{run.path} has trained {initial_epoch} epochs already (--epochs "
            f"{config.epochs}); raise --epochs to train on")

    for line in plan(config, arrays, streams, model, initial_epoch):
        log(line)
    verbose = config.verbose if config.verbose >= 0 else (1 if sys.stdout.isatty() else 2)
    fit_callbacks = _callbacks(config, run, model, checkpoint, stop, arrays, labelled, log,
                               chief)
    with warnings.catch_warnings():
        # Keras warns that its shuffle flag does not apply to a tf.data stream (shuffled here).
        warnings.filterwarnings("ignore", message="`shuffle=True` was passed")
        try:
            history = model.fit(streams.train, epochs=config.epochs,
                                initial_epoch=initial_epoch, callbacks=fit_callbacks,
                                verbose=verbose)
        except (tf.errors.UnavailableError, tf.errors.CancelledError,
                tf.errors.DeadlineExceededError, tf.errors.AbortedError,
                tf.errors.InternalError) as e:
            if config.strategy != "multi_worker":
                raise
            raise TrainingError(_worker_failure(e, checkpoint)) from None
    kept = checkpoint.manager.latest_checkpoint or "none yet"
    if checkpoint.write_error:
        raise TrainingError(checkpoint.write_error)
    if stop.signal_name:
        raise TrainingError(f"stopped by {stop.signal_name}; the last finished epoch's "
                            f"checkpoint is kept ({kept}): rerun the same command to resume")
    if checkpoint.bad_epoch is not None:
        raise TrainingError(f"the loss became NaN or inf in epoch {checkpoint.bad_epoch + 1}; "
                            f"training stopped and the last good checkpoint is kept ({kept}); "
                            "rerun to resume from it, or add --fresh with a lower "
                            "--learning_rate to start over")
    every = config.export_every  # -1: no exports; 0: only this one
    # PeriodicExport has exported the last epoch when it is the first or a multiple of `every`.
    at_end = every == 0 or (every > 0 and config.epochs % every != 0 and config.epochs != 1)
    if chief and initial_epoch < config.epochs and at_end:
        path = serving.export(model.float32_twin(), run.export, config.keep_exports,
                              config.export_iw_samples)
        log(f"exported {path}")
    return {k: v[-1] for k, v in history.history.items()} if history.history else {}
