"""Keras callbacks of a CaGeM training run: learning-rate decay, the clusters' naming, the
departures' end, graceful stops, checkpoints and the TensorBoard summaries that Keras' own
TensorBoard callback does not write. (The step's weight schedules are `cagem_tf.schedules`,
computed in the step.)"""

import math
import os
import signal
import threading
import time

import keras
import numpy as np
import tensorflow as tf

from cagem_tf import clustering, evaluation, figures, metrics, rundir, serving


class NameClusters(keras.callbacks.Callback):
    """At the start of epoch `epoch` (0-based: after `epoch` epochs) gives each class the
    cluster the labelled images of that class fall in most, one-to-one
    (`clustering.name_by_labels` on q(y|x) of `x_labelled`), and renames the model's y so
    (`CaGeM.rename_clusters`): the clusters found without labels keep their images and take
    the classes' names before the labelled cross-entropies start."""

    def __init__(self, epoch: int, x_labelled, y_labelled, num_classes: int, seed: int,
                 log=None):
        super().__init__()
        self.epoch, self.x, self.y = epoch, x_labelled, np.asarray(y_labelled)
        self.num_classes, self.seed, self.log = num_classes, seed, log
        self.order = None

    def on_epoch_begin(self, epoch, logs=None):
        if epoch != self.epoch:
            return
        log_q, _ = self.model.class_log_probs(self.x, seed=tf.constant([self.seed, 0]))
        self.order = clustering.name_by_labels(np.exp(log_q.numpy()), self.y,
                                               self.num_classes)
        self.model.rename_clusters(self.order)
        if self.log:
            names = ", ".join(f"{c}<-{k}" for c, k in enumerate(self.order))
            self.log(f"epoch {epoch + 1}: clusters named by the {len(self.y)} labelled images "
                     f"(class<-cluster: {names}); the labelled cross-entropies start")


class DropDepartures(keras.callbacks.Callback):
    """From epoch `epochs` on (where the departures' anneals end at 0) the model's step is the
    paper's alone: `CaGeM.drop_departures` retraces it without their terms."""

    def __init__(self, epochs: int, log=None):
        super().__init__()
        self.epochs, self.log = epochs, log

    def on_epoch_begin(self, epoch, logs=None):
        if epoch >= self.epochs and self.model.drop_departures() and self.log:
            self.log(f"epoch {epoch + 1}: the departures' weights are 0; the step is the "
                     "paper's alone from here")


def step_decay(learning_rate: float, decay: float, decay_epochs: int):
    """epoch -> learning_rate * decay ** (epoch // decay_epochs), for LearningRateScheduler."""
    def schedule(epoch, current=None):
        return learning_rate * decay ** (epoch // decay_epochs) if decay_epochs > 0 \
            else learning_rate
    return schedule


class GracefulStop(keras.callbacks.Callback):
    """SIGTERM or Ctrl-C (SIGINT) during `fit` stop training after the current call of the
    step (Keras' steps_per_execution steps at most): the interrupted epoch is neither
    checkpointed, evaluated nor exported, so the run keeps the last finished epoch's
    checkpoint and resumes from it. A second Ctrl-C interrupts at once.
    (Signal handlers can only be set from the main thread; elsewhere nothing changes.)"""

    SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C (SIGINT)"}

    def __init__(self):
        super().__init__()
        self.signal_name = None
        self.previous = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame):
        self.signal_name = self.SIGNALS[signum]
        self.model.stop_training = True
        signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))

    def on_train_begin(self, logs=None):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def on_train_end(self, logs=None):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}


def _scalar(variable) -> float:
    """A scalar variable's value, also when a tf.distribute strategy mirrors it."""
    return float(tf.convert_to_tensor(variable))


class EpochCheckpoint(keras.callbacks.Callback):
    """A tf.train checkpoint of the model, the optimizer (whose step count seeds the training
    noise, see `CaGeM.train_step`) and the epoch count at the end of every epoch whose loss is
    finite; keeps the last `keep`.

    TensorFlow writes the checkpoint files before it updates the index, so a process killed at
    any moment leaves the previous checkpoint intact. An epoch with a NaN or inf loss is never
    saved: `bad_epoch` records it and the last good checkpoint stays the latest. An epoch cut
    short by a signal (`stop`, the run's `GracefulStop`) is not saved either; `saved_epoch` is
    the last epoch saved (None before any). A checkpoint that cannot be written (a full disk)
    stops training with `write_error` set; its partial files are removed.
    `restore` falls back from a damaged checkpoint to the newest one that restores completely.
    `scratch`: a non-chief worker saves there (saving is collective) and removes it; it never
    moves the chief's files.
    """

    def __init__(self, directory: str, model, keep: int = 3, log=print,
                 scratch: str | None = None, stop: GracefulStop | None = None):
        super().__init__()
        self.directory, self.log, self.scratch, self.stop = directory, log, scratch, stop
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        model.optimizer.build(model.trainable_variables)
        self.others = {"optimizer": model.optimizer, "epoch": self.epoch}
        self.checkpointed_model = model
        self.checkpoint = model.checkpoint(**self.others)
        self.keep = keep
        self.manager = tf.train.CheckpointManager(self.checkpoint, directory, max_to_keep=keep)
        self.bad_epoch = self.write_error = self.saved_epoch = None

    def _set_aside(self, path: str, reason: str) -> None:
        """Moves the files of checkpoint `path` into checkpoints/damaged/ (never deletes)."""
        damaged = os.path.join(self.directory, "damaged")
        os.makedirs(damaged, exist_ok=True)
        for name in tf.io.gfile.glob(path + ".*"):
            os.replace(name, os.path.join(damaged, os.path.basename(name)))
        self.log(f"checkpoint {os.path.basename(path)} is damaged ({reason}); moved to "
                 f"{damaged}, trying the one before")

    def restore(self, path: str | None = None) -> int:
        """Restores `path` (default: the newest checkpoint that restores completely); returns
        the epochs done (0: none)."""
        candidates = [path] if path else list(reversed(self.manager.checkpoints))
        for candidate in candidates:
            try:
                self.checkpointed_model.checkpoint_to_read(candidate, **self.others).restore(
                    candidate).assert_existing_objects_matched()
            except (AssertionError, ValueError) as e:
                raise rundir.RunError(f"{candidate} does not match this run's model and "
                                      f"optimizer ({type(e).__name__}); add --fresh to start "
                                      "over (the old run is kept)") from None
            except (IndexError, tf.errors.OpError) as e:
                if path or self.scratch:
                    raise rundir.RunError(f"{candidate} is damaged ({type(e).__name__}: "
                                          f"{str(e).splitlines()[0][:120]})") from None
                self._set_aside(candidate, f"{type(e).__name__}: "
                                           f"{str(e).splitlines()[0][:120]}")
                continue
            if candidate != self.manager.latest_checkpoint:
                remaining = [c for c in self.manager.checkpoints
                             if tf.io.gfile.glob(c + ".index")]
                tf.compat.v1.train.update_checkpoint_state(
                    self.directory, candidate, all_model_checkpoint_paths=remaining)
                self.manager = tf.train.CheckpointManager(self.checkpoint, self.directory,
                                                          max_to_keep=self.keep)
            return int(self.epoch.numpy())
        if candidates:
            raise rundir.RunError(f"no checkpoint in {self.directory} restores (the damaged "
                                  f"ones are in {os.path.join(self.directory, 'damaged')}); "
                                  "add --fresh to start over (the old run is kept)")
        return 0

    def on_epoch_end(self, epoch, logs=None):
        if self.stop is not None and self.stop.requested:
            return
        loss = (logs or {}).get("loss")
        if loss is None or not math.isfinite(float(loss)):
            self.bad_epoch = epoch
            self.model.stop_training = True
            return
        self.epoch.assign(epoch + 1)
        try:
            if self.scratch:  # a non-chief worker's part of the collective save, then removed
                tf.train.CheckpointManager(self.checkpoint, self.scratch, max_to_keep=1).save(
                    checkpoint_number=epoch + 1)
                tf.io.gfile.rmtree(self.scratch)
            else:
                self.manager.save(checkpoint_number=epoch + 1)
        except (OSError, tf.errors.OpError) as e:
            # Only this process's files: a worker's are in its scratch, never the chief's.
            prefix = os.path.join(self.scratch or self.directory, f"ckpt-{epoch + 1}")
            for name in tf.io.gfile.glob(prefix + ".*") + tf.io.gfile.glob(prefix + "_temp*"):
                tf.io.gfile.rmtree(name) if tf.io.gfile.isdir(name) else tf.io.gfile.remove(name)
            self.epoch.assign(epoch)
            reason = os.strerror(e.errno) if getattr(e, "errno", None) else \
                str(e).splitlines()[0][:120]
            self.write_error = (f"could not write checkpoint {prefix} ({reason}); the last "
                                f"checkpoint ({self.manager.latest_checkpoint or 'none yet'}) is "
                                "intact: free space and rerun the same command to resume")
            self.model.stop_training = True
        else:
            self.saved_epoch = epoch + 1


class PeriodicExport(keras.callbacks.Callback):
    """A SavedModel after the first epoch and then every `every` epochs, after the epoch's
    checkpoint, and only for an epoch that `checkpoint` saved (not one with a NaN or inf loss,
    cut short by a signal, or whose checkpoint could not be written); keeps the
    newest `keep` versions (0: all). Exports compute in float32 whatever the training
    precision."""

    def __init__(self, export_dir: str, every: int, checkpoint: EpochCheckpoint, keep: int = 0,
                 iw_samples=serving.IW_SAMPLES, log=print):
        super().__init__()
        self.export_dir, self.every, self.keep = export_dir, every, keep
        self.iw_samples = iw_samples
        self.checkpoint, self.log = checkpoint, log

    def on_epoch_end(self, epoch, logs=None):
        if self.checkpoint.saved_epoch != epoch + 1:
            return
        if (epoch + 1) % self.every == 0 or epoch == 0:
            path = serving.export(self.model.float32_twin(), self.export_dir, self.keep,
                                  self.iw_samples)
            self.log(f"exported {path}")


class Summaries(keras.callbacks.Callback):
    """Every TensorBoard summary of a training run, on one step axis: the number of epochs
    done (1 after the first epoch), each scalar under its section's tag (`metrics.tag`:
    likelihood/elbo, kl/kl_z1, clusters/nmi, classifier/error_q, schedule/temperature, ...).
    The runs logs/train and logs/eval hold the same tag for the same quantity, so that
    TensorBoard overlays training and evaluation:

    logs/train, every epoch: what the step returned (`CaGeM.metrics`: the epoch's means of the
      ELBO's terms, loss, batch_usage; with labels h_p, h_q, the batch errors error_p,
      error_q, alpha), the learning rate, the value of each of the model's scheduled
      weights (`CaGeM.schedules`) at the epoch's end, seconds_per_epoch and hours_left.
    logs/eval, every `eval_every` epochs (and at the last), on the fixed images `x_eval`: the
      scalars of `evaluation.periodic_metrics` (elbo and its terms, iw_bound, active units)
      and of `evaluation.cluster_report` (cluster use; with labels the classifiers'
      `CLASSIFIER_KEYS`), occupancy and cluster-by-label charts, per-unit KL histograms,
      image grids of samples, class-conditional samples and reconstructions, and the
      Projector's z2 and z1 means with their label, cluster and epoch.
    logs (the run's root): the run's settings for the HParams dashboard, written once.
    An epoch cut short by `stop` or with a NaN loss writes nothing.
    """

    def __init__(self, run: rundir.RunDir, x_eval, y_eval, num_classes: int, eval_every: int,
                 iw_samples: int, epochs: int, report_errors: bool, seed: int = 0, log=print,
                 hparams: dict | None = None, stop: GracefulStop | None = None):
        super().__init__()
        self.run = run
        self.train_writer = tf.summary.create_file_writer(run.logs("train"))
        self.writer = tf.summary.create_file_writer(run.logs("eval"))
        self.x_eval, self.y_eval, self.num_classes = x_eval, y_eval, num_classes
        self.eval_every, self.iw_samples, self.epochs = eval_every, iw_samples, epochs
        self.report_errors, self.seed, self.log = report_errors, seed, log
        self.hparams, self.stop = hparams, stop
        self.started = self.epoch_started = None
        self.epochs_timed = 0

    def on_train_begin(self, logs=None):
        self.started = time.time()
        if self.hparams:
            from tensorboard.plugins.hparams import api as hp
            with tf.summary.create_file_writer(self.run.logs()).as_default():
                hp.hparams(self.hparams)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_started = time.time()

    def on_epoch_end(self, epoch, logs=None):
        if self.stop is not None and self.stop.requested:
            return
        step, logs = epoch + 1, logs or {}
        if "loss" in logs and not math.isfinite(float(logs["loss"])):
            # Training stops after this epoch and resumes from the one before: a summary of
            # it would stand beside the rerun's at the same step.
            self.log(f"epoch {step}: the loss is {float(logs['loss'])}; nothing of this epoch "
                     "is logged or evaluated")
            return
        seconds = time.time() - self.epoch_started
        self.epochs_timed += 1
        per_epoch = (time.time() - self.started) / self.epochs_timed
        hours_left = per_epoch * (self.epochs - step) / 3600
        scalars = {name: float(np.mean(value)) for name, value in logs.items()}
        scalars["learning_rate"] = _scalar(self.model.optimizer.learning_rate)
        for schedule in self.model.schedules:
            scalars.setdefault(schedule.name, _scalar(getattr(self.model, schedule.weight)))
        scalars.update(seconds_per_epoch=seconds, hours_left=hours_left)
        with self.train_writer.as_default(step=step):
            for name, value in scalars.items():
                tf.summary.scalar(metrics.tag(name), value)
        self.train_writer.flush()
        end = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(time.time() + hours_left * 3600))
        self.log(f"epoch {step}/{self.epochs} done: {seconds:.0f} s, elapsed "
                 f"{(time.time() - self.started) / 60:.1f} min, about {hours_left:.2f} h left "
                 f"(ends about {end})")
        if self.eval_every > 0 and (step % self.eval_every == 0 or step == self.epochs):
            with self.writer.as_default(step=step):
                self.evaluate(step)
            self.writer.flush()

    def evaluate(self, step):
        model = self.model.float32_twin()
        values = evaluation.periodic_metrics(model, self.x_eval, self.y_eval, self.iw_samples,
                                             seed=self.seed)
        clusters = evaluation.cluster_report(model, self.x_eval, self.y_eval, self.num_classes,
                                             self.seed, classifiers=self.report_errors)
        shown = {k: v for k, v in {**values, **clusters}.items() if np.isscalar(v)}
        for name, value in shown.items():
            tf.summary.scalar(metrics.tag(name), value)
        for name, image in figures.evaluation_images(model, self.x_eval, clusters,
                                                     [self.seed, step]).items():
            tf.summary.image(metrics.tag(name), image[None])
        tf.summary.histogram("kl/kl_z1_per_unit", values["kl_z1_per_unit"])
        tf.summary.histogram("kl/kl_z2_per_unit", values["kl_z2_per_unit"])
        figures.write_projector(self.run.logs("eval"), {
            "z2_means": values["z2_means"], "z1_means": values["z1_means"]}, {
            "label": self.y_eval, "cluster": np.argmax(clusters["q_y"], -1),
            "epoch": np.full(len(self.y_eval), step)})
        self.log(f"epoch {step} evaluation: " + ", ".join(
            f"{k} {v:.4g}" for k, v in shown.items()))
