"""The typed configuration: validation, its JSON form, and config.json files of earlier runs."""

import glob
import json
import os
import re

import pytest

from cagem_tf import files, rundir
from cagem_tf.config import Config, ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_one_width_means_two_layers_and_defaults_are_the_papers():
    config = Config(hidden_lower=[500], hidden_upper=256)
    assert config.hidden_lower == [500, 500] and config.hidden_upper == [256, 256]
    paper = Config()
    assert (paper.epochs, paper.warmup_epochs, paper.learning_rate, paper.lr_decay,
            paper.lr_decay_epochs, paper.beta) == (1000, 100, 1e-3, 0.75, 50, 0.1)
    assert (paper.cluster_usage, paper.pseudo_labels, paper.y_init_stddev) == (0, 0, 0)


@pytest.mark.parametrize("settings,message", [
    ({"epochs": 0}, "--epochs 0"), ({"labels": -1}, "--labels -1"),
    ({"hidden_lower": ["big"]}, "--hidden_lower big: give integers"),
    ({"strategy": "magic"}, "--strategy magic"), ({"lr_decay": 2.0}, "--lr_decay"),
    ({"pseudo_labels": 1.0, "departure_epochs": 0}, "--departure_epochs"),
    ({"pseudo_kmeans": "matched", "pseudo_labels": 1.0}, "--pseudo_kmeans matched .* --labels"),
    ({"pseudo_kmeans": "matched", "labels": 20}, "--pseudo_kmeans matched .* --pseudo_labels"),
    ({"pseudo_kmeans": "unsupervised", "labels": 20, "pseudo_labels": 1.0,
      "strategy": "mirrored"}, "--pseudo_kmeans unsupervised .* --strategy default"),
    ({"labels_seed": -2}, "--labels_seed -2: give a seed >= 0, or -1"),
    ({"labelled_elbo": 1.0}, "--labelled_elbo .* give --labels"),
    ({"labelled_elbo": -1.0, "labels": 20}, "--labelled_elbo -1.0: must be 0 or more"),
    ({"steps_per_execution": 0}, "--steps_per_execution 0: must be at least 1"),
    ({"export_every": -2}, "--export_every -2: give 0 or more, or -1 for no exports"),
])
def test_bad_settings_are_one_line_errors(settings, message):
    with pytest.raises(ConfigError, match=message) as error:
        Config(**settings)
    assert "\n" not in str(error.value)


def test_config_round_trips_through_json():
    config = Config(labels=100, hidden_lower=[1024, 512], pseudo_labels=0.5)
    assert Config.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_an_earlier_config_json_still_reads_and_an_unknown_key_is_refused(tmp_path):
    earlier = {k: v for k, v in Config(labels=20).to_dict().items()
               if k not in ("clip_norm", "y_init_stddev", "shared_noise", "cluster_usage",
                            "pseudo_labels", "departure_epochs", "keep_exports",
                            "pseudo_kmeans", "labelled_elbo")}
    earlier["test_binarization"] = "fixed"
    path = tmp_path / "config.json"
    path.write_text(json.dumps(earlier))
    assert rundir.RunDir(str(tmp_path)).read_config() == Config(labels=20)
    path.write_text(json.dumps({**earlier, "precision_of_magic": 3}))
    with pytest.raises(rundir.RunError, match="precision_of_magic") as error:
        rundir.RunDir(str(tmp_path)).read_config()
    assert "\n" not in str(error.value)


def test_the_plan_names_the_run_and_warns_of_a_long_cpu_run():
    import types

    import numpy as np

    from cagem_tf import training
    arrays = types.SimpleNamespace(name="mnist", x_train=np.zeros([60000]),
                                   x_test=np.zeros([10000]), image_shape=(28, 28, 1))
    streams = types.SimpleNamespace(num_unlabelled=60000, num_labelled=20, steps_per_epoch=600)
    model = types.SimpleNamespace(num_clusters=10, count_params=lambda: 3_000_000,
                                  steps_per_execution=10)
    paper = "\n".join(training.plan(Config(labels=20, model_dir="runs/x"), arrays, streams,
                                    model, 0))
    assert "60000 training images (20 labelled)" in paper and "epochs 1..1000 of 600 steps" in paper
    assert "tensorboard --logdir runs/x/logs" in paper
    assert "10 per call of the compiled step" in paper
    if not training.tf.config.list_physical_devices("GPU"):
        assert "no GPU: 1000 epochs on a CPU take many hours" in paper
        assert "experiments/quickstart.flags" in paper
    short = training.plan(Config(epochs=5, hidden_lower=[500], hidden_upper=[256]), arrays,
                          streams, model, 0)
    assert not any("no GPU" in line for line in short)


@pytest.mark.parametrize("settings,message", [
    ({"epochs": "10"}, "--epochs '10': must be an integer"),
    ({"beta": "0.1"}, "--beta '0.1': must be a number"),
    ({"seed": 1.5}, "--seed 1.5: must be an integer"),
    ({"epochs": True}, "--epochs True: must be an integer"),
    ({"skip_connection": 1}, "--skip_connection 1: must be true or false"),
    ({"precision": "float16"}, "--precision float16: use one of float32, mixed_bfloat16"),
    ({"data_dir": 3}, "--data_dir 3: must be a string"),
])
def test_values_of_the_wrong_type_in_a_config_file_are_one_line_errors(settings, message):
    with pytest.raises(ConfigError, match=message) as error:
        Config.from_dict({**Config().to_dict(), **settings})
    assert "\n" not in str(error.value)
    assert Config.from_dict({**Config().to_dict(), "beta": 1}).beta == 1.0  # an int is a number


@pytest.mark.parametrize("name", ["config.json", "model.json", "labelled_indices.json"])
def test_a_damaged_run_file_is_a_one_line_error_that_names_it(tmp_path, name):
    path = tmp_path / name
    path.write_text('{"epochs": 10, "bet')
    with pytest.raises(files.FileError, match=f"{name} is damaged") as error:
        files.read_json(str(path))
    assert "\n" not in str(error.value)
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(files.FileError, match="is damaged"):
        files.read_json(str(path))


def test_a_model_json_of_another_version_is_a_one_line_error(tmp_path):
    from cagem_tf.model import CaGeM
    model = CaGeM(image_shape=(4,), num_clusters=2, z1_dim=1, z2_dim=1, hidden_lower=4,
                  hidden_upper=4)
    (tmp_path / "checkpoints").mkdir()
    model.checkpoint().save(str(tmp_path / "checkpoints" / "ckpt"))
    (tmp_path / "model.json").write_text(json.dumps({**model.get_config(), "depth": 7}))
    with pytest.raises(rundir.RunError, match="model.json does not describe") as error:
        rundir.load_model(str(tmp_path), str(tmp_path / "checkpoints" / "ckpt-1"))
    assert "\n" not in str(error.value)


EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.flags")))


@pytest.mark.parametrize("flagfile", EXPERIMENTS, ids=os.path.basename)
def test_every_experiment_flagfile_is_a_configuration_the_trainer_accepts(flagfile, monkeypatch):
    from absl import flags

    from cagem_tf.cli import train
    # Flagfiles name the files they include relative to the checkout, as the README runs them.
    monkeypatch.chdir(ROOT)
    values = flags.FlagValues()
    train.define_flags(values)
    values(["train", f"--flagfile={flagfile}"])
    config = train.config_from_flags(values)  # a Config checks itself when made
    # What the file's name says it trains is what it configures: CaGeM-<N> has N labels, a VAE
    # one cluster.
    name = os.path.basename(flagfile)
    trains = re.search(r"cagem(\d+)", name)
    if trains:
        assert config.labels == int(trains.group(1)) and config.clusters != 1
    if "vae" in name:
        assert (config.clusters, config.labels) == (1, 0)
