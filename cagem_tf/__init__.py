"""cagem-tf: the Cluster-aware Generative Model (Maaloe, Fraccaro, Winther 2017) in TF2/Keras 3."""

from cagem_tf import objective
from cagem_tf.model import CaGeM

__all__ = ["CaGeM", "objective"]
