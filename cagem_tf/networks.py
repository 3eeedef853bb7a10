"""The conditional networks of CaGeM: each maps its inputs to one TFP distribution.

Every network is `NN(inputs) -> Linear heads`, with NN two (or more) Dense layers, each followed
by batch normalization and ReLU. A network with several inputs projects each input with its own
Dense layer and sums the projections before the first normalization, so that inputs with different
leading (sample or enumeration) shapes are projected once at their own shape and only broadcast
afterwards: x is projected once per example, a one-hot y once per cluster.

`call` returns plain tensors (a SavedModel cannot carry TFP distributions); `distribution` wraps
them in the `tfd` distribution named in each class.

Architectures: "mlp" (the paper's permutation-invariant networks) uses Dense layers only. With
"conv", an input that is an image x (given flattened, [..., D], D = H*W*C) is projected by
`ConvProjection`: two stride-2 3x3 convolutions with batch normalization and ReLU, then the
Dense projection, still once per example; and p(x|y,z1) ends in a `ConvHead`: a Dense map to a
[H/4, W/4, 64] grid and a stride-2 transposed convolution shared by the heads, then one
stride-2 transposed convolution to the image per head.

Likelihoods of x (images in [0, 1]): `BernoulliNet` for binarized data; for 8-bit data
`DiscretizedLogisticNet`, a logistic over the 256 levels with its tails folded into levels 0 and
255 (TFP's QuantizedDistribution), so that the probabilities of the 256 levels sum to 1.
"""

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from cagem_tf.config import ConfigError

tfd = tfp.distributions


# Channel multiple at which oneDNN's bfloat16 batch norm has its fast kernel (measured:
# 480, 496 and 512 fast; 100, 500 and 504 slow; docs/performance.md).
BFLOAT16_CHANNELS = 16


class BatchNorm(keras.layers.BatchNormalization):
    """Batch normalization whose moving statistics can be left untouched in training mode.

    `training=True, collect=False` normalises with the moments of the batch, as in training, but
    does not update `moving_mean` / `moving_variance`. CaGeM collects statistics only in the
    unlabelled pass; the labelled pass uses this mode.

    In training (unless synchronized over replicas) the normalization runs as TensorFlow's fused
    kernel on the input seen as [N,1,1,C], N the product of the leading axes: the same function
    and gradient as Keras' composite ops, in one op each way, about twice as fast on a CPU.
    The moving variance is updated with the biased batch variance, as Keras does. In bfloat16
    the kernel runs in float32 when the channels are not a multiple of `BFLOAT16_CHANNELS`.
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
        # oneDNN's bfloat16 kernel is fast only for multiples of 16 channels; at others (the CPU
        # protocol's 500) it is about 25x slower than float32, so those run in float32.
        cast = flat.dtype == tf.bfloat16 and channels % BFLOAT16_CHANNELS != 0
        outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            tf.cast(flat, tf.float32) if cast else flat, self.gamma, self.beta,
            epsilon=self.epsilon, is_training=True)
        outputs = tf.cast(outputs, flat.dtype)
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
                 first_input_stddev: float = 0.0, image_input: int | None = None,
                 image_shape: Sequence[int] | None = None, conv_heads: bool = False, **kwargs):
        """image_input: the index of the input that is an image x (flattened), projected by a
        `ConvProjection` of `image_shape`; conv_heads: the heads come from one `ConvHead` of
        `image_shape` (each head's units must be its D)."""
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
        bn = {"momentum": bn_momentum, "synchronized": synchronized_bn, "dtype": policy}
        self.projections = [
            ConvProjection(image_shape, hidden[0], bn, name=f"input_{i}")
            if i == image_input else
            keras.layers.Dense(hidden[0], use_bias=False, name=f"input_{i}",
                               kernel_initializer=first if i == 0 else "glorot_uniform",
                               dtype=policy)
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
        self.conv_head = None
        if conv_heads:
            self.conv_head = ConvHead(image_shape, bn, list(head_units), zero=["log_scale"],
                                      name="conv_head")
            self.heads = []
        else:
            self.heads = [keras.layers.Dense(units, name=name, kernel_initializer=(
                "zeros" if name == "log_scale" else "glorot_uniform"), dtype=policy)
                for name, units in head_units.items()]
        object.__setattr__(self, "_folded", None)

    def fold_batch_norm(self) -> list:
        """Folds inference's batch norm into the weights, for `call(training=False)` until
        `unfold_batch_norm`: with the moving statistics BN(h) = h s + t, s = gamma /
        sqrt(var + eps), t = beta - mean s, so

            ReLU(BN(sum_i W_i u_i)) = ReLU(sum_i u_i (W_i s) + t),  ReLU(BN(W h)) = ReLU(h (W s) + t):

        one product per layer instead of a product, a scale and a shift per row (the same
        function up to rounding). A snapshot of the weights (for an export, whose weights do
        not change); returns the folded weights as variables. Convolutional networks are left
        as they are (returns [])."""
        if self.conv_head is not None or not all(
                isinstance(p, keras.layers.Dense) for p in self.projections):
            return []

        def scale_shift(norm):
            s = norm.gamma * tf.math.rsqrt(norm.moving_variance + norm.epsilon)
            return s, norm.beta - norm.moving_mean * s

        s, t = scale_shift(self.norms[0])
        folded = {"inputs": [tf.Variable(p.kernel * s, trainable=False) for p in self.projections],
                  "shift": tf.Variable(t, trainable=False), "hidden": []}
        for dense, norm in zip(self.hidden_layers, self.norms[1:]):
            s, t = scale_shift(norm)
            folded["hidden"].append((tf.Variable(dense.kernel * s, trainable=False),
                                     tf.Variable(t, trainable=False)))
        object.__setattr__(self, "_folded", folded)
        return [*folded["inputs"], folded["shift"], *(v for pair in folded["hidden"] for v in pair)]

    def unfold_batch_norm(self):
        """Back to batch norm as a layer (after `fold_batch_norm`)."""
        object.__setattr__(self, "_folded", None)

    def _matmul(self, u, kernel):
        """u [..., d] times kernel [d, H] as one 2-D product, in the compute dtype."""
        kernel = tf.cast(kernel, self.dtype_policy.compute_dtype)
        u = tf.cast(u, kernel.dtype)
        flat = tf.matmul(tf.reshape(u, [-1, kernel.shape[0]]), kernel)
        return tf.reshape(flat, tf.concat([tf.shape(u)[:-1], [kernel.shape[1]]], 0))

    def project(self, inputs, projected=None, training=None, collect=True):
        """sum_i W_i u_i over the inputs that are not None, plus `projected`: the first layer
        before normalization.

        Each input is projected at its own leading shape and the sum broadcasts them. `projected`
        is the projection of the inputs given as None, computed once by the caller (that of x,
        reused across chunks of samples).
        """
        terms = self._terms(inputs, projected, training, collect)
        h = terms[0]
        for term in terms[1:]:
            h = h + term
        return h

    def _terms(self, inputs, projected, training, collect):
        """The terms W_i u_i of `project` (folded: W_i s), and `projected`."""
        if len(inputs) != self.num_inputs:
            raise ValueError(f"{self.name} takes {self.num_inputs} inputs, got {len(inputs)}")
        if self._folded is not None and not training:
            terms = [self._matmul(u, kernel)
                     for kernel, u in zip(self._folded["inputs"], inputs) if u is not None]
        else:
            terms = [projection(u, training=training, collect=collect)
                     if isinstance(projection, ConvProjection) else projection(u)
                     for projection, u in zip(self.projections, inputs) if u is not None]
        return terms + ([projected] if projected is not None else [])

    def _folded_hidden(self, inputs, projected):
        """The last hidden layer of `call` with batch norm folded (`fold_batch_norm`): the
        shift t joins the smallest term of the first layer's broadcast sum, and the further
        layers are 2-D products with a bias and a ReLU (one fused kernel each)."""
        terms = _smallest_first(self._terms(inputs, projected, False, False))
        h = terms[0] + tf.cast(self._folded["shift"], terms[0].dtype)
        for term in terms[1:]:
            h = h + term
        h = tf.nn.relu(h)
        leading = tf.shape(h)[:-1]
        h = tf.reshape(h, [-1, h.shape[-1]])
        for kernel, shift in self._folded["hidden"]:
            h = tf.nn.relu(tf.nn.bias_add(tf.matmul(h, tf.cast(kernel, h.dtype)),
                                          tf.cast(shift, h.dtype)))
        return tf.reshape(h, tf.concat([leading, [h.shape[-1]]], 0))

    def call(self, inputs, training=None, collect=True, projected=None):
        if self._folded is not None and not training:
            h = self._folded_hidden(inputs, projected)
        else:
            h = self.project(inputs, projected, training, collect)
            h = tf.nn.relu(self.norms[0](h, training=training, collect=collect))
            for dense, norm in zip(self.hidden_layers, self.norms[1:]):
                h = tf.nn.relu(norm(dense(h), training=training, collect=collect))
        # Densities, KL terms and the loss are computed in float32 whatever the policy.
        outputs = (self.conv_head(h, training=training, collect=collect) if self.conv_head
                   else tuple(head(h) for head in self.heads))
        outputs = tuple(tf.cast(out, tf.float32) for out in outputs)
        return outputs if len(outputs) > 1 else outputs[0]


def _smallest_first(terms):
    """The terms of a broadcast sum, the one with the fewest elements first (statically known
    shapes first, then the lowest rank): what is added to the first term is added once."""
    def size(term):
        known = term.shape.is_fully_defined()
        return (0 if known else 1, term.shape.num_elements() if known else term.shape.rank or 0)
    return sorted(terms, key=size)


def _check_image_shape(image_shape) -> tuple[int, int, int]:
    h, w, c = (int(d) for d in image_shape)
    if h % 4 or w % 4:
        raise ConfigError(f"--architecture conv: images of {h}x{w} pixels; the convolutions "
                          "halve them twice, so height and width must be multiples of 4 (e.g. "
                          "28, 32): use --architecture mlp, or resize the images")
    return h, w, c


def _leading(x, last_dims: int):
    """The leading shape of x before its `last_dims` last axes."""
    return tf.shape(x)[:tf.rank(x) - last_dims]


class ConvProjection(keras.layers.Layer):
    """x [..., D] (D = H*W*C, an image flattened) -> [..., units]: Conv(32, 3x3, stride 2),
    BN, ReLU, Conv(64, 3x3, stride 2), BN, ReLU, flattened, then a Dense map without bias (the
    first layer's batch normalization follows, in `Conditional`)."""

    def __init__(self, image_shape, units: int, bn: dict, **kwargs):
        super().__init__(dtype=bn["dtype"], **kwargs)
        self.image_shape = _check_image_shape(image_shape)
        self.convs = [keras.layers.Conv2D(f, 3, strides=2, padding="same", use_bias=False,
                                          name=f"conv_{i}", dtype=bn["dtype"])
                      for i, f in enumerate((32, 64))]
        self.norms = [BatchNorm(name=f"conv_bn_{i}", **bn) for i in range(2)]
        self.dense = keras.layers.Dense(units, use_bias=False, name="dense", dtype=bn["dtype"])

    def call(self, x, training=None, collect=True):
        lead = _leading(x, 1)
        h = tf.reshape(x, [-1, *self.image_shape])
        for conv, norm in zip(self.convs, self.norms):
            h = tf.nn.relu(norm(conv(h), training=training, collect=collect))
        h = tf.reshape(h, [tf.shape(h)[0], int(np.prod(h.shape[1:]))])
        out = self.dense(h)
        return tf.reshape(out, tf.concat([lead, [out.shape[-1]]], 0))


class ConvHead(keras.layers.Layer):
    """h [..., F] -> one [..., D] per head for images [H,W,C]: a trunk shared by the heads
    (Dense to [H/4, W/4, 64], BN, ReLU, ConvTranspose(32, 3x3, stride 2), BN, ReLU), then per
    head ConvTranspose(C, 3x3, stride 2), flattened. Sharing the trunk computes the costly
    upsampling once for all heads (a discretized logistic's location and scale).
    `zero`: the heads whose last kernel starts at zero (a log-scale head: sigma = 1 at the
    start)."""

    def __init__(self, image_shape, bn: dict, heads: Sequence[str], zero: Sequence[str] = (),
                 **kwargs):
        super().__init__(dtype=bn["dtype"], **kwargs)
        h, w, c = self.image_shape = _check_image_shape(image_shape)
        self.grid = (h // 4, w // 4, 64)
        self.dense = keras.layers.Dense(int(np.prod(self.grid)), use_bias=False, name="dense",
                                        dtype=bn["dtype"])
        self.up = keras.layers.Conv2DTranspose(32, 3, strides=2, padding="same", use_bias=False,
                                               name="up_0", dtype=bn["dtype"])
        self.outs = [keras.layers.Conv2DTranspose(c, 3, strides=2, padding="same",
                                                  name=f"{name}_up_1",
                                                  kernel_initializer="zeros" if name in zero
                                                  else "glorot_uniform", dtype=bn["dtype"])
                     for name in heads]
        self.norms = [BatchNorm(name=f"up_bn_{i}", **bn) for i in range(2)]

    def call(self, h, training=None, collect=True):
        lead = _leading(h, 1)
        g = tf.reshape(self.dense(tf.reshape(h, [-1, h.shape[-1]])), [-1, *self.grid])
        g = tf.nn.relu(self.norms[0](g, training=training, collect=collect))
        g = tf.nn.relu(self.norms[1](self.up(g), training=training, collect=collect))
        shape = tf.concat([lead, [int(np.prod(self.image_shape))]], 0)
        return tuple(tf.reshape(out(g), shape) for out in self.outs)


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


class Bernoulli(tfd.Bernoulli):
    """`tfd.Bernoulli` whose log-density from logits l is computed as

        log p(x) = x l - softplus(l),

    one softplus and one product per pixel. TFP's form, (1 - x)(-softplus(l)) + x(-softplus(-l))
    with guarded products, is the same function but takes two of each and guards infinite
    logits, which a network's are not; over K x S x B x D pixels the difference shows in the
    train step and the IW bound (docs/performance.md)."""

    def _log_prob(self, event):
        if self._logits is None:
            return super()._log_prob(event)
        logits = tf.convert_to_tensor(self._logits)
        return tf.cast(event, logits.dtype) * logits - tf.math.softplus(logits)


class BernoulliNet(Conditional):
    """Independent Bernoulli over the D flattened pixels: prod_d Ber(x_d; sigmoid(logits_d(u))).

    `call` -> logits [..., D]. `distribution` -> Independent(Bernoulli), batch [...], event [D].
    """

    def __init__(self, dim: int, hidden: Sequence[int], num_inputs: int, **kwargs):
        super().__init__(num_inputs, hidden, {"logits": dim}, **kwargs)

    @staticmethod
    def observe(x):
        """What the distribution is over, from images x in [0, 1]: x itself (binary)."""
        return x

    def distribution(self, inputs, training=None, collect=True, projected=None):
        logits = self(inputs, training=training, collect=collect, projected=projected)
        return tfd.Independent(Bernoulli(logits=logits, dtype=tf.float32),
                               reinterpreted_batch_ndims=1)

    def mean(self, inputs):
        """E[x] in [0, 1], [..., D]: the pixels' probabilities."""
        return tf.sigmoid(self(inputs))

    def draw(self, inputs, seed=None, u=None):
        """(E[x], a sample of x) in [0, 1], each [..., D]: x = [u < p] for u ~ U(0, 1), given
        or drawn from a stateless seed."""
        probs = self.mean(inputs)
        u = tf.random.stateless_uniform(tf.shape(probs), seed) if u is None else u
        return probs, tf.cast(u < probs, tf.float32)


LEVELS = 256


class DiscretizedLogisticNet(Conditional):
    """Independent discretized logistics over the D pixels of 8-bit images: pixel level
    k = 255 x in {0..255} has P(k) = F(k + 1/2) - F(k - 1/2) for 0 < k < 255, P(0) = F(1/2),
    P(255) = 1 - F(254.5), with F the CDF of Logistic(mu, s): the 256 probabilities sum to 1.
    mu = 127.5 (1 + m) and s = 127.5 exp(l) for the linear heads m and l (l bounded like the
    Gaussians' log sigma), in levels. Built from TFP: QuantizedDistribution(Logistic(mu - 1/2,
    s), low=0, high=255), whose integer j takes (j - 1, j], i.e. Logistic(mu) on
    (j - 1/2, j + 1/2].

    `call` -> (loc m, log_scale l), each [..., D]. `distribution` -> over the levels k,
    batch [...], event [D]; `observe` maps images x in [0, 1] to their levels.
    """

    def __init__(self, dim: int, hidden: Sequence[int], num_inputs: int, **kwargs):
        super().__init__(num_inputs, hidden, {"loc": dim, "log_scale": dim}, **kwargs)

    @staticmethod
    def observe(x):
        return tf.round(x * (LEVELS - 1))

    def _levels(self, inputs, training=None, collect=True, projected=None):
        m, l = self(inputs, training=training, collect=collect, projected=projected)
        half = (LEVELS - 1) / 2
        return half * (1.0 + m), half * tf.exp(LOG_SCALE_BOUND * tf.tanh(l / LOG_SCALE_BOUND))

    def distribution(self, inputs, training=None, collect=True, projected=None):
        loc, scale = self._levels(inputs, training, collect, projected)
        levels = tfd.QuantizedDistribution(tfd.Logistic(loc - 0.5, scale), low=0.0,
                                           high=float(LEVELS - 1))
        return tfd.Independent(levels, reinterpreted_batch_ndims=1)

    def mean(self, inputs):
        """E[x] in [0, 1], [..., D], of the logistic before its tails are folded in: mu,
        clipped to the levels' range (within a fraction of a level of the discretized mean
        unless s is large)."""
        loc, _ = self._levels(inputs)
        return tf.clip_by_value(loc, 0.0, LEVELS - 1.0) / (LEVELS - 1)

    def draw(self, inputs, seed=None, u=None):
        """(E[x], a sample of x) in [0, 1], each [..., D]: the level nearest the logistic's
        quantile mu + s log(u / (1 - u)) for u ~ U(0, 1), given or drawn from a stateless
        seed."""
        loc, scale = self._levels(inputs)
        if u is None:
            u = tf.random.stateless_uniform(tf.shape(loc), seed)
        u = tf.clip_by_value(u, 1e-6, 1 - 1e-6)
        level = tf.clip_by_value(tf.round(loc + scale * (tf.math.log(u) - tf.math.log1p(-u))),
                                 0.0, LEVELS - 1.0)
        return tf.clip_by_value(loc, 0.0, LEVELS - 1.0) / (LEVELS - 1), level / (LEVELS - 1)


LIKELIHOODS = {"bernoulli": BernoulliNet, "discretized_logistic": DiscretizedLogisticNet}
