"""cagem-tf: the Cluster-aware Generative Model (Maaloe, Fraccaro, Winther 2017) in TF2/Keras 3.

Modules (docs/architecture.md): networks, objective, model (the model); data, clustering;
config, rundir (a run's settings and directory); callbacks, training (a training run);
evaluation, report, figures (measures and the report); serving (SavedModels); cli (programs);
benchmark (speed and FLOP counts). Submodules load on first use, so that a program that needs
only TensorFlow (cagem-sample) does not import Keras models or TFP.
"""

import importlib

__all__ = ["CaGeM", "Config", "objective"]
_SUBMODULES = ("benchmark", "callbacks", "cli", "clustering", "config", "cpu", "data", "evaluation",
               "figures", "model", "networks", "objective", "report", "rundir", "serving",
               "training")


def __getattr__(name):
    if name == "CaGeM":
        return importlib.import_module("cagem_tf.model").CaGeM
    if name == "Config":
        return importlib.import_module("cagem_tf.config").Config
    if name in _SUBMODULES:
        return importlib.import_module(f"cagem_tf.{name}")
    raise AttributeError(f"module 'cagem_tf' has no attribute {name!r}")
