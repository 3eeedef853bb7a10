"""The run directory: every path of a run, the rules for resuming and starting over, and the
reading back of a finished run (its model, its scored images).

  config.json             the run's `Config`
  model.json              the model's constructor arguments
  labelled_indices.json   the labelled training indices
  checkpoints/            tf.train checkpoints, one per epoch
  logs/train, logs/eval   TensorBoard runs of training and of the periodic evaluation; logs/eval
                          also holds the Projector's embedding
  logs/evaluation         TensorBoard images of the evaluation program
  export/<n>/             SavedModel versions (TF Serving layout)
  evaluation/             results.json, results.md, figures; partial/<split>-<checkpoint>-<id>/
                          the per-image IW bounds of one checkpoint's weights
"""

import hashlib
import os
import time

import tensorflow as tf

from cagem_tf import data, files, serving
from cagem_tf.files import UserError, read_json, write_json
from cagem_tf.config import MAY_CHANGE, Config, ConfigError
from cagem_tf.model import CaGeM

CONFIG = "config.json"
MODEL = "model.json"
LABELLED = "labelled_indices.json"


class RunError(UserError, ValueError):
    """A run directory that cannot be used as asked; the message says what to do."""


class RunDir:
    """The paths of the run in `path`; nothing is created until a writer asks."""

    def __init__(self, path: str):
        self.path = path

    def join(self, *parts) -> str:
        return os.path.join(self.path, *parts)

    @property
    def config(self) -> str:
        return self.join(CONFIG)

    @property
    def model(self) -> str:
        return self.join(MODEL)

    @property
    def labelled(self) -> str:
        return self.join(LABELLED)

    @property
    def checkpoints(self) -> str:
        return self.join("checkpoints")

    @property
    def export(self) -> str:
        return self.join("export")

    def newest_export(self) -> str | None:
        """The newest SavedModel version of the run (what TF Serving serves), or None."""
        newest = serving.versions(self.export)
        return os.path.join(self.export, str(newest[-1])) if newest else None

    @property
    def evaluation(self) -> str:
        return self.join("evaluation")

    def partial(self, checkpoint: str, split: str) -> str:
        """Where the per-image bounds of `checkpoint`'s weights on `split` are kept. The name
        carries a digest of the checkpoint's index (which holds every tensor's checksum): a
        later checkpoint of the same name (after more epochs, or after a damaged one was set
        aside) never reuses the bounds of other weights."""
        with tf.io.gfile.GFile(checkpoint + ".index", "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:12]
        return self.join("evaluation", "partial",
                         f"{split}-{os.path.basename(checkpoint)}-{digest}")

    def logs(self, run: str = "") -> str:
        """logs/ (TensorBoard's --logdir), or one of its runs: train, eval, evaluation."""
        return self.join("logs", run) if run else self.join("logs")

    def latest_checkpoint(self) -> str | None:
        return tf.train.latest_checkpoint(self.checkpoints)

    def read_config(self) -> Config:
        if not os.path.isfile(self.config):
            raise RunError(f"{self.path}: no {CONFIG}; is it a run directory of the training "
                           "program?")
        try:
            return Config.from_dict(read_json(self.config), self.config)
        except ConfigError as e:
            raise RunError(str(e)) from None


def _holds_anything(model_dir: str) -> bool:
    return os.path.isdir(model_dir) and bool(set(os.listdir(model_dir)) - {files.Lock.FILE})


def set_aside(model_dir: str, log=print) -> None:
    """Moves an existing run to `<model_dir>.<UTC time>` (what --fresh does): nothing is
    deleted. Refused while another process holds the run's lock."""
    if not _holds_anything(model_dir):
        return
    with files.Lock(model_dir, "moving the run aside"):
        aside = f"{model_dir.rstrip(os.sep)}.{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
        os.rename(model_dir, aside)
    log(f"--fresh: the earlier run in {model_dir} is kept as {aside}")


def prepare(config: Config, log=print) -> bool:
    """Makes config.model_dir ready for `config`; returns True when it resumes an earlier run.

    A directory holding a run with other settings (except those in `MAY_CHANGE`) is refused
    with the differing flags named. (`set_aside` is --fresh.)
    """
    run = RunDir(config.model_dir)
    model_dir = run.path
    now = config.to_dict()
    if os.path.isfile(run.config):
        saved = run.read_config().to_dict()
        changed = [k for k in now if k not in MAY_CHANGE and saved[k] != now[k]]
        if changed:
            listed = ", ".join(f"--{k} (run: {saved[k]!r}, now: {now[k]!r})" for k in changed)
            raise RunError(f"{model_dir} holds a run with other settings: {listed}; rerun with "
                           "the run's flags to resume it, or add --fresh to start over "
                           "(the old run is kept)")
        write_json(run.config, {**saved, **{k: now[k] for k in MAY_CHANGE}})
        return True
    if _holds_anything(model_dir):
        raise RunError(f"--model_dir {model_dir} is not empty and holds no {CONFIG}: choose a "
                       "new directory")
    os.makedirs(model_dir, exist_ok=True)
    write_json(run.config, now)
    return False


def load_model(model_dir: str, checkpoint: str | None = None, precision: str = "float32"):
    """The model of a run directory with the weights of `checkpoint` (default: the latest),
    computing in `precision` (float32 by default, whatever the run trained in)."""
    run = RunDir(model_dir)
    if not os.path.isfile(run.model):
        raise RunError(f"{model_dir}: no {MODEL}; is it a run directory of the training "
                       "program?")
    checkpoint = checkpoint or run.latest_checkpoint()
    if not checkpoint or not tf.io.gfile.glob(checkpoint + ".index"):
        raise RunError(f"{model_dir}: checkpoint {checkpoint or '(none yet)'} not found; "
                       "train at least one epoch or pass an existing --checkpoint")
    settings = read_json(run.model)
    try:
        model = CaGeM(**{**settings, "precision": precision})
    except (TypeError, ValueError) as e:
        raise RunError(f"{run.model} does not describe a model this version builds "
                       f"({str(e).splitlines()[0][:100]}); use the version that wrote it") from None
    try:
        model.checkpoint_to_read(checkpoint).restore(checkpoint).expect_partial() \
            .assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as e:
        raise RunError(f"{checkpoint} does not hold the variables of the model in "
                       f"{run.model} ({type(e).__name__}); was it written by another "
                       "version or run?") from None
    return model


def evaluation_images(model_dir: str, subset: int = 0, split: str = "test", log=print):
    """(config, x, y, num_classes) of a run: the first `subset` images (0: all) of its test
    split or of its --validation hold-out, as the model sees them (`data.observed`: binarized
    once with the run's seed for a Bernoulli likelihood), as every evaluation scores them."""
    config = RunDir(model_dir).read_config()
    arrays = data.load(config.dataset, config.data_dir, config.manual_dir, log=log)
    if split == "validation":
        if not config.validation:
            raise RunError(f"{model_dir} was trained without --validation")
        arrays = data.hold_out(arrays, config.validation, config.seed)
    n = min(subset or len(arrays.x_test), len(arrays.x_test))
    return (config, data.observed(arrays.x_test[:n], config.likelihood, config.seed),
            arrays.y_test[:n], arrays.num_classes)
