"""The straightforward reference CaGeM that the benchmark compares against.

Each network concatenates all its inputs, broadcast (tiled) to their common leading shape, and
applies one Dense layer to the concatenation: x and z1 enter q(z2|x,y,z1) and p(x|y,z1) K times
per sample instead of once. Its kernel is the concatenation of the library's per-input kernels,
so it computes the same function with the same weights (tests/test_bench.py checks this), and
the difference in speed is the cost of the multiply-adds the per-input projections remove.
"""

import types

import tensorflow as tf

from cagem_tf import CaGeM
from cagem_tf.model import NETWORKS


def _tiled_project(net, inputs, projected=None, training=None, collect=True):
    """[..., sum_i d_i] @ concat_i W_i with every input broadcast to the common leading shape.

    Here `projected` carries the raw input left as None (x), not its projection.
    """
    inputs = [projected if u is None else u for u in inputs]
    lead = tf.shape(inputs[0])[:-1]
    for u in inputs[1:]:
        lead = tf.broadcast_dynamic_shape(lead, tf.shape(u)[:-1])
    u = tf.concat([tf.broadcast_to(u, tf.concat([lead, [u.shape[-1]]], 0)) for u in inputs],
                  axis=-1)
    kernel = tf.concat([p.kernel for p in net.projections], axis=0)
    h = tf.matmul(tf.reshape(u, [-1, u.shape[-1]]), kernel)
    return tf.reshape(h, tf.concat([lead, [kernel.shape[-1]]], 0))


class TiledCaGeM(CaGeM):
    """CaGeM whose networks tile their inputs over K and concatenate them (see module doc)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in NETWORKS:
            net = getattr(self, name)
            net.project = types.MethodType(_tiled_project, net)

    def x_parts(self, x, training=False, collect=True):
        if not self.built:  # CaGeM.__init__ builds the layers before they are swapped
            return super().x_parts(x, training, collect)
        # Nothing is projected ahead: the networks take x itself and tile it.
        x = self.flatten(x)
        return {"x": x, "x_observed": self.p_x.observe(x),
                "q_z1": self.q_z1.distribution([x], training=training, collect=collect),
                "q_y": x, "q_z2": x if self.spec.skip_connection else None}
