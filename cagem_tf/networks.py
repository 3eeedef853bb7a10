"""The conditional networks of CaGeM: each maps its inputs to one TFP distribution.

Every network is `NN(inputs) -> Linear heads`, with NN two (or more) Dense layers, each followed
by batch normalization and ReLU. A network with several inputs projects each input with its own
Dense layer and sums the projections before the first normalization, so that inputs with different
leading (sample or enumeration) shapes are projected once at their own shape and only broadcast
afterwards: x is projected once per example, a one-hot y once per cluster.

`call` returns plain tensors (a SavedModel cannot carry TFP distributions); `distribution` wraps
them in the `tfd` distribution named in each class.
"""

from collections.abc import Sequence

import keras
import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions


class BatchNorm(keras.layers.BatchNormalization):
    """Batch normalization whose moving statistics can be left untouched in training mode.

    `training=True, collect=False` normalises with the moments of the batch, as in training, but
    does not update `moving_mean` / `moving_variance`. CaGeM collects statistics only in the
    unlabelled pass; the labelled pass uses this mode.

    In training (unless synchronized over replicas) the normalization runs as TensorFlow's fused
    kernel on the input seen as [N,1,1,C], N the product of the leading axes: the same function
    and gradient as Keras' composite ops, in one op each way, about twice as fast on a CPU.
    The moving variance is updated with the biased batch variance, as Keras does.
    """

    def build(self, input_shape):
        super().build(input_shape)
        # Any rank: the enumeration over y and the sample dims add leading axes.
        self.input_spec = keras.InputSpec(min_ndim=2, axes={-1: input_shape[-1]})

    def _moments(self, inputs, mask):
        # Every axis but the features is a batch axis (the enumeration over y, the samples),
        # whatever the rank of the input that built the layer.
        return keras.ops.moments(inputs, axes=list(range(len(inputs.shape) - 1)),
                                 synchronized=self.synchronized)

    def call(self, inputs, training=None, mask=None, collect=True):
        if not (training and self.trainable):
            return super().call(inputs, training=training, mask=mask)
        if self.synchronized:
            if collect:
                return super().call(inputs, training=training, mask=mask)
            mean, variance = self._moments(inputs, mask)
            return keras.ops.batch_normalization(
                inputs, mean, variance, axis=self.axis, offset=self.beta,
                scale=self.gamma, epsilon=self.epsilon)
        channels = inputs.shape[-1]
        flat = tf.reshape(inputs, [-1, 1, 1, channels])
        outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            flat, self.gamma, self.beta, epsilon=self.epsilon, is_training=True)
        if collect:
            n = tf.cast(tf.shape(flat)[0], variance.dtype)
            variance = variance * (n - 1.0) / tf.maximum(n, 2.0)  # the kernel's is unbiased
            self.moving_mean.assign(self.moving_mean * self.momentum
                                    + mean * (1.0 - self.momentum))
            self.moving_variance.assign(self.moving_variance * self.momentum
                                        + variance * (1.0 - self.momentum))
        return tf.reshape(outputs, tf.shape(inputs))


class Conditional(keras.Model):
    """h = ReLU(BN(sum_i W_i u_i)), then h = ReLU(BN(W h)) per further width; linear heads.

    Inputs are tensors [..., d_i] whose leading shapes broadcast against each other; the output
    heads have the broadcast leading shape.
    """

    def __init__(self, num_inputs: int, hidden: Sequence[int], head_units: dict[str, int],
                 bn_momentum: float = 0.9, synchronized_bn: bool = False,
                 first_input_stddev: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        hidden = tuple(int(h) for h in hidden)
        if not hidden or min(hidden) <= 0:
            raise ValueError(f"hidden widths must be positive integers, got {hidden}")
        self.num_inputs = num_inputs
        # No biases before batch normalization: its offset makes them redundant.
        # first_input_stddev > 0: the first input's kernel ~ N(0, stddev^2) instead of Glorot;
        # CaGeM uses it for the one-hot y, whose Glorot rows are small beside x's projection.
        first = (keras.initializers.RandomNormal(stddev=first_input_stddev)
                 if first_input_stddev > 0 else "glorot_uniform")
        # Under a mixed policy (`dtype`) the layers compute in bfloat16 and keep float32
        # variables; the heads' outputs are cast to float32 (see `call`).
        policy = self.dtype_policy
        self.projections = [keras.layers.Dense(hidden[0], use_bias=False, name=f"input_{i}",
                                               kernel_initializer=first if i == 0
                                               else "glorot_uniform", dtype=policy)
                            for i in range(num_inputs)]
        self.hidden_layers = [keras.layers.Dense(w, use_bias=False, name=f"hidden_{i + 1}",
                                                 dtype=policy)
                              for i, w in enumerate(hidden[1:])]
        # synchronized: moments over the global batch when replicas split it.
        self.norms = [BatchNorm(momentum=bn_momentum, synchronized=synchronized_bn, name=f"bn_{i}",
                                dtype=policy)
                      for i in range(len(hidden))]
        # Scale heads start at zero (sigma = 1 everywhere): batch-normalised sparse ReLU features
        # can otherwise give log sigma of +-10 at initialisation, and KL terms of 1e8.
        self.heads = [keras.layers.Dense(units, name=name, kernel_initializer=(
            "zeros" if name == "log_scale" else "glorot_uniform"), dtype=policy)
            for name, units in head_units.items()]

    def project(self, inputs, projected=None):
        """sum_i W_i u_i over the inputs that are not None, plus `projected`: the first layer
        before normalization.

        Each input is projected at its own leading shape and the sum broadcasts them. `projected`
        is the projection of the inputs given as None, computed once by the caller (that of x,
        reused across chunks of samples).
        """
        if len(inputs) != self.num_inputs:
            raise ValueError(f"{self.name} takes {self.num_inputs} inputs, got {len(inputs)}")
        terms = [projection(u) for projection, u in zip(self.projections, inputs)
                 if u is not None]
        if projected is not None:
            terms.append(projected)
        h = terms[0]
        for term in terms[1:]:
            h = h + term
        return h

    def call(self, inputs, training=None, collect=True, projected=None):
        h = self.project(inputs, projected)
        h = tf.nn.relu(self.norms[0](h, training=training, collect=collect))
        for dense, norm in zip(self.hidden_layers, self.norms[1:]):
            h = tf.nn.relu(norm(dense(h), training=training, collect=collect))
        # Densities, KL terms and the loss are computed in float32 whatever the policy.
        outputs = tuple(tf.cast(head(h), tf.float32) for head in self.heads)
        return outputs if len(outputs) > 1 else outputs[0]


LOG_SCALE_BOUND = 10.0


class GaussianNet(Conditional):
    """Diagonal Gaussian N(z; mu(u), diag(sigma(u)^2)), with mu and log sigma linear heads.

    log sigma = b tanh(h / b) for the linear head h and b = LOG_SCALE_BOUND: the identity for
    |h| << b, but sigma stays in [e^-b, e^b] so that far-out inputs (a wide q(z2) early in
    training) cannot overflow a density.
    `call` -> (loc, log_scale), each [..., dim]. `distribution` -> MultivariateNormalDiag with
    batch shape [...] (the broadcast leading shape of the inputs) and event shape [dim].
    """

    def __init__(self, dim: int, hidden: Sequence[int], num_inputs: int, **kwargs):
        super().__init__(num_inputs, hidden, {"loc": dim, "log_scale": dim}, **kwargs)

    def call(self, inputs, training=None, collect=True, projected=None):
        loc, log_scale = super().call(inputs, training=training, collect=collect,
                                      projected=projected)
        return loc, LOG_SCALE_BOUND * tf.tanh(log_scale / LOG_SCALE_BOUND)

    def distribution(self, inputs, training=None, collect=True, projected=None):
        loc, log_scale = self(inputs, training=training, collect=collect, projected=projected)
        return tfd.MultivariateNormalDiag(loc=loc, scale_diag=tf.exp(log_scale))


class CategoricalNet(Conditional):
    """Cat(y; softmax(logits(u))) over K clusters.

    `call` -> logits [..., K]. `distribution` -> Categorical, batch [...], event [].
    """

    def __init__(self, num_classes: int, hidden: Sequence[int], num_inputs: int, **kwargs):
        super().__init__(num_inputs, hidden, {"logits": num_classes}, **kwargs)

    def distribution(self, inputs, training=None, collect=True, projected=None):
        return tfd.Categorical(logits=self(inputs, training=training, collect=collect,
                                           projected=projected))


class BernoulliNet(Conditional):
    """Independent Bernoulli over the D flattened pixels: prod_d Ber(x_d; sigmoid(logits_d(u))).

    `call` -> logits [..., D]. `distribution` -> Independent(Bernoulli), batch [...], event [D].
    """

    def __init__(self, dim: int, hidden: Sequence[int], num_inputs: int, **kwargs):
        super().__init__(num_inputs, hidden, {"logits": dim}, **kwargs)

    def distribution(self, inputs, training=None, collect=True, projected=None):
        logits = self(inputs, training=training, collect=collect, projected=projected)
        return tfd.Independent(tfd.Bernoulli(logits=logits, dtype=tf.float32),
                               reinterpreted_batch_ndims=1)
