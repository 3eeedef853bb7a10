"""The schedules of a training step's scalar weights, computed in the step itself.

A schedule gives a weight of the model (its variable `weight`: the KL temperature, alpha, a
departure's weight) as a function of the training progress in epochs,

    t = step / steps_per_epoch,        step: the optimizer's count of steps taken,

which `CaGeM.train_step` evaluates before its loss. So the weights move every step whether
Keras runs one step per call of the compiled function or several (`steps_per_execution`),
and a run restored from a checkpoint (its optimizer's count with it) continues the line.

    Linear(start, E, end, b):  w(t) = 0                                   for t < b,
                               w(t) = end + (start - end) * max(0, 1 - (t - b) / E)  after;
                                                                          end when E = 0

The KL warm-up is Linear(0, E, 1): T(t) = min(1, t / E), 1 when E = 0. It moves every step,
not once per epoch, so that the first epoch does not run at T = 0 throughout (with no KL cost
at all, q(z1|x) drifts arbitrarily far from p(z1|y,z2)).

A schedule computes in float64 (t up to millions of steps, exactly) and its value is cast to
the weight's float32 when it is set; called with a Python number it gives a float.
"""

import dataclasses

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Linear:
    """The model's scalar variable `weight` linear from `start` to `end` over `epochs` epochs,
    then `end` for good; with `begin` > 0 it is 0 for the first `begin` epochs and the line
    starts there. `name`: what summaries call it (schedule/<name>; default `weight`)."""
    weight: str
    name: str = ""
    start: float = 0.0
    epochs: float = 0
    end: float = 0.0
    begin: float = 0

    def __post_init__(self):
        if not self.name:
            object.__setattr__(self, "name", self.weight)

    def __call__(self, t):
        value = self.value(tf.cast(t, tf.float64))
        return float(value) if isinstance(t, (int, float)) else value

    def value(self, t: tf.Tensor) -> tf.Tensor:
        if self.epochs <= 0:
            line = tf.fill(tf.shape(t), tf.constant(self.end, tf.float64))
        else:
            done = (t - self.begin) / self.epochs
            line = self.end + (self.start - self.end) * tf.maximum(
                tf.constant(0.0, tf.float64), 1.0 - done)
        return tf.where(t < self.begin, tf.zeros_like(t), line)
