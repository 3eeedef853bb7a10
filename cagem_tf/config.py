"""The settings of a training run: the `ModelSpec` of its networks, the `Config` of the whole run
(which extends it), their validation and JSON form.

Every field is a flag of the training program (`cagem_tf.cli.train` defines them from the
fields' help texts) and a key of the run's config.json; a `ModelSpec` field is also a key of
the run's model.json and of `CaGeM.get_config()`. Defaults are the paper's settings. A new
model setting is one field of `ModelSpec`: its flag, its validation by type, config.json,
model.json and the Keras config follow from it.
"""

import dataclasses
import types
import typing

from cagem_tf.files import UserError

PSEUDO_KMEANS = ("seeded", "matched", "unsupervised")
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
# The opt-in departures from the paper's objective, each annealed to 0 over --departure_epochs:
# {setting: the weighted term of `objective` it adds}.
DEPARTURES = {"cluster_usage": "batch_usage", "pseudo_labels": "h_pseudo",
              "z2_code": "h_z2_code", "labelled_elbo": "h_labelled_elbo"}
PRECISIONS = ("float32", "mixed_bfloat16")
LIKELIHOODS = ("bernoulli", "discretized_logistic")
ARCHITECTURES = ("mlp", "conv")
# Fields that may differ when a run is resumed: they do not change what is being trained.
MAY_CHANGE = ("epochs", "eval_every", "eval_iw_samples", "eval_subset", "export_every",
              "export_iw_samples",
              "keep_exports", "keep_checkpoints", "data_dir", "manual_dir", "strategy", "fresh",
              "verbose", "model_dir", "collective_timeout", "steps_per_execution")
# Keys of config.json files written by earlier versions that no longer mean anything:
# test_binarization never reached the evaluation, which always binarizes once.
RETIRED = ("test_binarization",)


class ConfigError(UserError, ValueError):
    """A setting no run can use; the message is one line that says what to do."""


_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _field(default, help_text, **metadata):
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default),
                                 metadata={"help": help_text, **metadata})
    return dataclasses.field(default=default, metadata={"help": help_text, **metadata})


class _Settings:
    """Typed dataclass fields with help texts: type checks, the lists of integers, JSON form."""

    LISTS = ()       # list[int] fields; one value w of a width field means [w, w]
    WIDTHS = ()

    def __post_init__(self):
        self._check_types()
        for key in self.LISTS:
            values = getattr(self, key)
            values = [values] if isinstance(values, int) else list(values)
            try:
                values = [int(w) for w in values]
            except (TypeError, ValueError):
                raise ConfigError(f"--{key} {','.join(map(str, values))}: give integers, e.g. "
                                  "1024 or 1024,512") from None
            if not values or min(values) < 1:
                raise ConfigError(f"--{key} {values}: give one or more positive integers")
            setattr(self, key, values * 2 if len(values) == 1 and key in self.WIDTHS
                    else values)
        self.check()

    def _check_types(self) -> None:
        """One-line errors for values of the wrong type (as a config.json may hold): ints are
        ints (not 1.5, "10" or true), floats numbers (an int is taken), bools bools, strings
        strings, and a setting with choices one of them. Lists of integers are checked by
        __post_init__."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and \
                type(None) in typing.get_args(hint)
            if optional and value is None or typing.get_origin(hint) is list:
                continue
            kind = next(a for a in typing.get_args(hint) if a is not type(None)) \
                if optional else hint
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
                continue
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                raise ConfigError(f"--{f.name} {value!r}: must be {_KIND_NAMES[kind]}")
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise ConfigError(f"--{f.name} {value}: use one of {', '.join(choices)}")

    def check(self) -> None:
        """One-line errors for settings no run can use (beyond their types)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @classmethod
    def fields(cls):
        """(name, type, default, help, choices) of every setting, in order."""
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            yield f.name, hints[f.name], default, f.metadata["help"], f.metadata.get("choices")


@dataclasses.dataclass
class ModelSpec(_Settings):
    """What defines a CaGeM's networks and its sampling (`CaGeM(spec, image_shape,
    num_clusters)`; the data set fixes the other two). The paper's model by default."""
    z1_dim: int = _field(64, "Size of z1.")
    z2_dim: int = _field(32, "Size of z2.")
    hidden_lower: list[int] = _field([1024, 1024], "Hidden widths of q(z1|x), q(y|z1,x), "
                                     "p(x|y,z1); one value w means [w, w].")
    hidden_upper: list[int] = _field([512, 512], "Hidden widths of q(z2|x,y,z1), p(z1|y,z2), "
                                     "p(y|z2); one value w means [w, w].")
    skip_connection: bool = _field(True, "Give q(z2|x,y,z1) the input x.")
    precision: str = _field("float32", "Training precision: mixed_bfloat16 runs the networks' "
                            "matmuls and activations in bfloat16 (variables, batch-norm "
                            "statistics, densities, the loss and the optimizer stay float32); "
                            "evaluations and exports are float32 either way.",
                            choices=PRECISIONS)
    num_samples: int = _field(1, "Samples of z1 (and z2 per y) in the training ELBO.")
    y_init_stddev: float = _field(0.0, "Initialise the first-layer weights of the one-hot y "
                                  "from N(0, s^2); 0: Glorot (the paper does not say).")
    shared_noise: bool = _field(False, "One noise draw for z2 in every y branch (common random "
                                "numbers; the same objective in expectation).")
    classifier_samples: int = _field(10, "Samples of z1 over which the classifiers q(y|x) and "
                                     "p(y|x) average (evaluations and exports).")
    likelihood: str = _field("bernoulli", "p(x|y,z1): bernoulli over images binarized anew "
                             "every step (the paper's protocol); discretized_logistic over "
                             "the 256 levels of 8-bit images, fed as they are (likelihoods "
                             "also in bits per dimension).", choices=LIKELIHOODS)
    architecture: str = _field("mlp", "Networks touching x: mlp (the paper's "
                               "permutation-invariant ones) or conv (convolutions with batch "
                               "normalization in q(z1|x) and the x inputs of q(y|z1,x) and "
                               "q(z2|x,y,z1), transposed convolutions in p(x|y,z1); image "
                               "height and width multiples of 4).", choices=ARCHITECTURES)

    LISTS = WIDTHS = ("hidden_lower", "hidden_upper")

    def check(self) -> None:
        for key in ("z1_dim", "z2_dim", "num_samples", "classifier_samples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key} {getattr(self, key)}: must be at least 1")
        if self.y_init_stddev < 0:
            raise ConfigError(f"--y_init_stddev {self.y_init_stddev}: must be 0 or more")

    def spec(self) -> "ModelSpec":
        """The model's settings alone (of a `Config`: the spec it holds)."""
        return ModelSpec(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ModelSpec)})


@dataclasses.dataclass
class Config(ModelSpec):
    """A CaGeM training run: its model (the `ModelSpec` fields, first), then data and
    optimisation settings; then the run's evaluation, export and bookkeeping; last the opt-in
    levers and departures of the cluster study (docs/results.md), all off by default."""
    dataset: str = _field("mnist", "tfds name (mnist, fashion_mnist, kmnist, omniglot), an .npz "
                          "file (x_train, y_train, x_test, y_test) or a directory of the four "
                          "MNIST IDX files.")
    labels: int = _field(0, "Labelled training points, the same number per class; 0 trains "
                         "unsupervised.")
    clusters: int = _field(0, "K, the values of y; 0 means the number of classes, the only K "
                           "allowed when --labels > 0.")
    epochs: int = _field(1000, "Epochs (passes over the training set) in all, counting those of "
                         "a resumed run.")
    batch_size: int = _field(100, "Unlabelled examples per step.")
    labelled_batch_size: int = _field(100, "Labelled examples per step (at most --labels).")
    steps_per_execution: int = _field(10, "Training steps per call of the compiled step "
                                      "(Keras' steps_per_execution): fewer calls from Python, "
                                      "the same steps (the weights' schedules are computed in "
                                      "the step). The progress bar and Ctrl-C act between "
                                      "calls. --strategy multi_worker runs 1.")
    beta: float = _field(0.1, "alpha = beta * (N_u + N_l) / N_l weighs the labelled "
                         "cross-entropies.")
    beta_start: float = _field(0.0, "beta at the start of training, moved linearly to --beta "
                               "over --beta_epochs (the paper's objective with --beta from "
                               "then on; the paper does not state beta); 0: --beta "
                               "throughout.")
    beta_epochs: int = _field(5, "Epochs over which beta moves from --beta_start to --beta.")
    learning_rate: float = _field(1e-3, "Initial Adam learning rate.")
    lr_decay: float = _field(0.75, "Learning rate factor every --lr_decay_epochs.")
    lr_decay_epochs: int = _field(50, "Epochs between decays.")
    warmup_epochs: int = _field(100, "Epochs of KL warm-up (temperature linear from 0 to 1); 0 "
                                "disables it.")
    seed: int = _field(0, "Seed of the labelled subset (unless --labels_seed), the data "
                       "order, the initial weights and the model's sampling.")
    labels_seed: int = _field(-1, "Seed of the labelled subset alone, so that one subset can "
                              "be trained from several --seed (or several subsets from one); "
                              "-1: --seed.")
    model_dir: str = _field("runs/cagem", "Run directory: config, checkpoints, logs, exports.")
    data_dir: str | None = _field(None, "tensorflow-datasets data directory.")
    manual_dir: str | None = _field(None, "Folder with the data set's original files (e.g. the "
                                    "four MNIST .gz files) for tfds to prepare offline.")
    validation: int = _field(0, "Hold out this many training examples and evaluate on them "
                             "instead of the test set.")
    eval_every: int = _field(10, "Epochs between evaluations; 0: none.")
    eval_iw_samples: int = _field(100, "Importance samples of the evaluation's IW bound; 0 "
                                  "skips it.")
    eval_subset: int = _field(1000, "Evaluation images (the first ones).")
    export_every: int = _field(10, "SavedModel exports after the first epoch, then every this "
                               "many epochs, and at the end; 0: only at the end; -1: none "
                               "(export a checkpoint later with export/main.py).")
    export_iw_samples: list[int] = _field([1000], "Importance samples S of the exported "
                                          "log_likelihood_<S> signatures (one or more).")
    keep_exports: int = _field(3, "Export versions kept (the newest; TF Serving serves the "
                               "newest); 0 keeps all.")
    keep_checkpoints: int = _field(3, "Checkpoints kept.")
    strategy: str = _field("default", "tf.distribute strategy; multi_worker reads TF_CONFIG "
                           "(every worker runs the same command; --batch_size is the global "
                           "batch, split between the workers).", choices=STRATEGIES)
    collective_timeout: int = _field(0, "multi_worker: seconds a collective waits for the "
                                     "other workers before it fails; 0 (the default): no "
                                     "timeout of its own (TensorFlow gives each timed "
                                     "collective a waiting thread, thousands a minute in a "
                                     "real run), a dead worker is found by the coordination "
                                     "service's heartbeats and stops the job within seconds.")
    fresh: bool = _field(False, "Start over: an existing run in --model_dir is moved aside to "
                         "<model_dir>.<time>.")
    verbose: int = _field(-1, "Keras progress: 0 silent, 1 bar, 2 a line per epoch, -1 the bar "
                          "on a terminal and a line per epoch otherwise.")
    clip_norm: float = _field(0.0, "Clip the gradient to this global norm; 0: no clipping (the "
                              "paper does not say).")
    cluster_usage: float = _field(0.0, "DEPARTURE from the paper: weight of the batch's cluster "
                                  "entropy H(mean q(y|x)) added to the objective, annealed to 0 "
                                  "over --departure_epochs.")
    pseudo_labels: float = _field(0.0, "DEPARTURE from the paper: weight of a cross-entropy of "
                                  "q(y|z1,x) on k-means labels of the unlabelled images "
                                  "(restricted to the classifier networks), annealed to 0 over "
                                  "--departure_epochs. With --labels, the k-means is named "
                                  "after the classes as --pseudo_kmeans says.")
    pseudo_kmeans: str = _field("seeded", "With --labels and --pseudo_labels: seeded (centres "
                                "start at the labelled images' class means, which then keep "
                                "their class: constrained k-means) or matched (plain k-means, "
                                "each cluster named after the class most labelled images in "
                                "it have, one-to-one, and the labelled images keep their "
                                "class) or unsupervised (labels late: the unsupervised "
                                "recipe, plain k-means and no labelled term, for "
                                "--departure_epochs; then each class is given the model's "
                                "cluster its labelled images' q(y|x) fall in most, one-to-one, "
                                "y is renamed so, and the labelled cross-entropies start, "
                                "with --beta_start's schedule from there).",
                                choices=PSEUDO_KMEANS)
    z2_code: float = _field(0.0, "DEPARTURE from the paper: weight of E_q(y|z1,x)[-log "
                            "p(y|z2^y)], the cross-entropy of p(y|z2) on the cluster each z2 "
                            "was drawn for, added through q(z2|x,y,z1) and p(y|z2) only, so "
                            "that z2 carries y and the cascade p(y|x) reads it; annealed to 0 "
                            "over --departure_epochs.")
    labelled_elbo: float = _field(0.0, "DEPARTURE from the paper: weight of -F(x_l, y_l), the "
                                  "labelled batch's ELBO with y set to each image's label "
                                  "(Kingma et al. 2014's labelled term), reaching every "
                                  "network (the paper lets labels reach p(y|z2) and q(y|z1,x) "
                                  "only); annealed to 0 over --departure_epochs. Needs "
                                  "--labels.")
    departure_epochs: int = _field(5, "Epochs over which --cluster_usage, --pseudo_labels, "
                                   "--z2_code and --labelled_elbo fall linearly to 0.")


    LISTS = ("hidden_lower", "hidden_upper", "export_iw_samples")

    def check(self) -> None:
        """One-line errors for settings no run can use."""
        super().check()
        for key in ("epochs", "batch_size", "labelled_batch_size", "lr_decay_epochs",
                    "keep_checkpoints", "steps_per_execution"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key} {getattr(self, key)}: must be at least 1")
        for key in ("warmup_epochs", "eval_every", "eval_iw_samples", "eval_subset",
                    "keep_exports", "validation", "clusters", "labels",
                    "collective_timeout",
                    "clip_norm", "cluster_usage", "pseudo_labels",
                    "z2_code", "labelled_elbo", "departure_epochs"):
            if getattr(self, key) < 0:
                raise ConfigError(f"--{key} {getattr(self, key)}: must be 0 or more")
        if self.export_every < -1:
            raise ConfigError(f"--export_every {self.export_every}: give 0 or more, or -1 for "
                              "no exports")
        if self.labels_seed < -1:
            raise ConfigError(f"--labels_seed {self.labels_seed}: give a seed >= 0, or -1 "
                              "for --seed's subset")
        if not self.learning_rate > 0 or not 0 < self.lr_decay <= 1:
            raise ConfigError("--learning_rate must be > 0 and --lr_decay in (0, 1]")
        if not self.beta >= 0 or not self.beta_start >= 0:
            raise ConfigError(f"--beta {self.beta}, --beta_start {self.beta_start}: must be "
                              ">= 0")
        if self.beta_start and (self.beta_epochs < 1 or not self.beta):
            raise ConfigError("--beta_start moves beta to --beta over --beta_epochs: give "
                              "--beta > 0 and --beta_epochs of 1 or more")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"--strategy {self.strategy}: use one of {', '.join(STRATEGIES)}")
        if self.departures and self.departure_epochs < 1:
            raise ConfigError("--cluster_usage, --pseudo_labels, --z2_code and --labelled_elbo "
                              "are annealed to 0: give --departure_epochs of 1 or more")
        if self.labelled_elbo and not self.labels:
            raise ConfigError("--labelled_elbo is the ELBO of the labelled images: give "
                              "--labels too")
        if self.pseudo_kmeans != "seeded" and not (self.labels and self.pseudo_labels):
            raise ConfigError(f"--pseudo_kmeans {self.pseudo_kmeans} names k-means clusters "
                              "after labelled classes: give --labels and --pseudo_labels too")
        if self.labels_late and self.strategy != "default":
            raise ConfigError("--pseudo_kmeans unsupervised renames the clusters in one "
                              "process: use --strategy default")

    @property
    def subset_seed(self) -> int:
        """The seed that picks the labelled subset: --labels_seed, or --seed when it is -1."""
        return self.seed if self.labels_seed == -1 else self.labels_seed

    @property
    def departures(self) -> bool:
        """Whether an annealed departure from the paper's objective is on."""
        return any(getattr(self, setting) for setting in DEPARTURES)

    @property
    def labels_late(self) -> bool:
        """The labelled cross-entropies start after the departure (--pseudo_kmeans
        unsupervised)."""
        return self.pseudo_kmeans == "unsupervised"

    @classmethod
    def from_dict(cls, values: dict, what: str = "the settings") -> "Config":
        """A Config from a dict such as config.json. Keys missing from an earlier version's
        file take their defaults (which reproduce that version's behaviour); retired keys are
        dropped; an unknown key is a one-line error."""
        if not isinstance(values, dict):
            raise ConfigError(f"{what} is not a JSON object of settings; start a new run")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names - set(RETIRED))
        if unknown:
            raise ConfigError(f"{what} has settings this version does not know "
                              f"({', '.join(unknown)}): use the version that wrote it, or "
                              "start a new run")
        return cls(**{k: v for k, v in values.items() if k in names})
