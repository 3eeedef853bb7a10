"""The Cluster-aware Generative Model (CaGeM) as a Keras model with a custom train step.

Generative model  p(x,y,z1,z2) = p(x|y,z1) p(z1|y,z2) p(y|z2) p(z2):
  p(z2) = N(0, I)            p(y|z2) = Cat(pi(z2))
  p(z1|y,z2) = N(mu, sigma)  p(x|y,z1) = Bernoulli(logits)
Inference model   q(y,z1,z2|x) = q(z2|x,y,z1) q(y|z1,x) q(z1|x):
  q(z1|x) = N                q(y|z1,x) = Cat            q(z2|x,y,z1) = N (x: skip connection)

Layout of enumerated tensors: y (K clusters) first, then samples (S), then examples (B). The sum
over y is done by feeding the K one-hot vectors, shaped [K,1,1,K], alongside z1 [S,B,d1] and
x [B,D]; the networks broadcast them to [K,S,B,...]. With K = 1 the model is a two-layer VAE.
"""

import contextlib
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from cagem_tf import objective
from cagem_tf.config import DEPARTURES, ModelSpec
from cagem_tf.networks import LIKELIHOODS, CategoricalNet, GaussianNet

tfd = tfp.distributions

# Samples per chunk of the IW bound by estimator, at similar memory: an exact chunk holds K
# values of y per sample, a sampled one a single value.
IW_CHUNK = {"exact": 100, "sampled": 500}
# The cascade's activations [K,S,B,H] beyond which inference computes it one class per loop
# iteration: 16 MiB of float32 (measured on the AMX Xeon: 1.24x at N = 256 with K = S = 10,
# H = 256; a 1 MiB threshold was slower at N = 96-128; docs/performance.md).
BY_CLASS_ACTIVATIONS = 1 << 22
# The six conditional networks, inference model first.
NETWORKS = ("q_z1", "q_y", "q_z2", "p_y", "p_z1", "p_x")
SPEC_FIELDS = tuple(name for name, *_ in ModelSpec.fields())
# Variables added after checkpoints were keyed by variable path: a checkpoint of the earlier,
# positional layout ("weights/<i>") holds all the others, in `weights` order.
NOT_IN_POSITIONAL_CHECKPOINTS = ("code_weight", "label_weight", "labelled_elbo_weight")


@keras.saving.register_keras_serializable(package="cagem_tf")
class CaGeM(keras.Model):
    """CaGeM over images of `image_shape`, flattened to D pixels, with K = `num_clusters`.

    Args:
      spec: the `ModelSpec` (or a `Config`, which holds one) of the networks and their
        sampling; keyword arguments named like its fields override it (`CaGeM(z1_dim=8)`).
        Its fields, as the paper has them:
        z1_dim, z2_dim: sizes of the Gaussian layers;
        hidden_lower: hidden widths of the networks touching x: q(z1|x), q(y|z1,x), p(x|y,z1);
        hidden_upper: hidden widths of q(z2|x,y,z1), p(z1|y,z2), p(y|z2);
        skip_connection: whether q(z2|x,y,z1) sees x;
        num_samples: samples of z1 (and of z2 per y) in the training ELBO;
        classifier_samples: samples of z1 used by the classifiers (`class_log_probs`);
        y_init_stddev: > 0 draws the first-layer weights of the one-hot y in q(z2|x,y,z1),
          p(z1|y,z2) and p(x|y,z1) from N(0, y_init_stddev^2), so that the K branches differ
          from the start; 0 keeps Keras' Glorot initialisation (the paper leaves it open);
        precision: "float32", or "mixed_bfloat16": the networks' matmuls and activations in
          bfloat16 (Keras' mixed policy), variables, batch-norm statistics, log-densities, KL
          terms, logsumexp and the loss in float32. `float32_twin()` gives the same model
          computing in float32, for evaluations and exports;
        shared_noise: draw z2^y = mu_y + sigma_y * eps with one eps for every y (common random
          numbers): the per-branch terms then differ by the branches, not by their noise. Each
          z2^y still follows q(z2|x,y,z1), so the ELBO and the IW bound are unchanged in
          expectation.
      image_shape: shape of one image, e.g. (28, 28, 1).
      num_clusters: K, the number of values of y (the number of classes when labels are used).
      seed: seed of the model's random stream (sampling in training and evaluation).
      synchronized_bn: batch normalization over the global batch when replicas split it.

    `get_config()` is the spec's fields with these four (and the name): model.json and the
    Keras config, so that `keras.saving.load_model` rebuilds the model from a .keras file.
    """

    def __init__(self, spec: ModelSpec | None = None, image_shape: Sequence[int] = (28, 28, 1),
                 num_clusters: int = 10, seed: int | None = None,
                 synchronized_bn: bool = False, **kwargs):
        settings = {k: kwargs.pop(k) for k in list(kwargs) if k in SPEC_FIELDS}
        super().__init__(**kwargs)
        base = spec.spec().to_dict() if spec is not None else {}
        self.spec = ModelSpec(**{**base, **settings})
        self.image_shape = tuple(int(d) for d in image_shape)
        self.data_dim = int(np.prod(self.image_shape))
        if num_clusters < 1:
            raise ValueError("num_clusters must be >= 1")
        self.num_clusters = int(num_clusters)
        self.seed = seed
        self.synchronized_bn = bool(synchronized_bn)
        object.__setattr__(self, "_twin", None)
        spec = self.spec
        K, lower, upper = self.num_clusters, spec.hidden_lower, spec.hidden_upper
        z1_dim, z2_dim, skip_connection = spec.z1_dim, spec.z2_dim, spec.skip_connection
        sync = {"synchronized_bn": self.synchronized_bn,
                "dtype": keras.DTypePolicy(spec.precision)}
        y_first = {**sync, "first_input_stddev": spec.y_init_stddev}

        conv = spec.architecture == "conv"
        image = lambda index: {"image_input": index, "image_shape": self.image_shape} \
            if conv else {}
        # Inference model q(y,z1,z2|x); the comments give each network's inputs in order.
        self.q_z1 = GaussianNet(z1_dim, lower, 1, name="q_z1", **sync, **image(0))     # x
        self.q_y = CategoricalNet(K, lower, 2, name="q_y", **sync, **image(1))         # z1, x
        self.q_z2 = GaussianNet(z2_dim, upper, 3 if skip_connection else 2, name="q_z2",
                                **y_first, **image(2))                                   # y, z1, x
        # Generative model p(x,y,z1,z2).
        self.p_y = CategoricalNet(K, upper, 1, name="p_y", **sync)                     # z2
        self.p_z1 = GaussianNet(z1_dim, upper, 2, name="p_z1", **y_first)               # y, z2
        heads = {"conv_heads": True, "image_shape": self.image_shape} if conv else {}
        self.p_x = LIKELIHOODS[spec.likelihood](self.data_dim, lower, 2, name="p_x",
                                                 **y_first, **heads)                     # y, z1

        # The step's scalar weights: the KL temperature, the opt-in departures' weights (see
        # `train_step`) and alpha as the step sees it (`compile`'s alpha, or a schedule's value
        # on the way to it). `schedule` makes the step set them; each replica sets the same.
        scalar = lambda name, initializer: self.add_weight(  # noqa: E731
            shape=(), initializer=initializer, trainable=False, name=name,
            aggregation="only_first_replica")
        self.temperature = scalar("temperature", "ones")
        self.usage_weight = scalar("usage_weight", "zeros")
        self.pseudo_weight = scalar("pseudo_weight", "zeros")
        self.code_weight = scalar("code_weight", "zeros")
        self.labelled_elbo_weight = scalar("labelled_elbo_weight", "zeros")
        self.label_weight = scalar("label_weight", "zeros")
        self.schedules, self.steps_per_epoch = (), 0
        self.seed_generator = keras.random.SeedGenerator(seed, name="seed_generator")
        self.alpha = 0.0
        self.cluster_usage = self.pseudo_labels = self.z2_code = self.labelled_elbo = False
        self.trackers, self.terms = {}, ()
        # Build every variable now, so that compile, checkpoints and exports see them all. The
        # first call of each network gives all its inputs: Keras keeps that call's input specs
        # for the layer's own saved signature (later calls may pass x projected, as None).
        self.class_log_probs(tf.zeros([1, self.data_dim]), 1, seed=tf.constant([0, 0]))
        self.latent_terms(tf.zeros([1, self.data_dim]), num_samples=1, seed=tf.constant([0, 0]))
        self.sample(1, seed=tf.constant([0, 0]))
        self.built = True

    # ----------------------------------------------------------------------------------------
    # Distributions
    @property
    def p_z2(self):
        """p(z2) = N(0, I): batch [], event [z2_dim]."""
        return tfd.MultivariateNormalDiag(loc=tf.zeros([self.spec.z2_dim]))

    @property
    def code_variables(self):
        """The variables of q(z2|x,y,z1) and p(y|z2), the only ones the z2-code departure
        trains."""
        return self.q_z2.trainable_variables + self.p_y.trainable_variables

    @property
    def classifier_variables(self):
        """theta_y and phi_y: the variables of p(y|z2) and q(y|z1,x), the only ones the labelled
        cross-entropies train."""
        return self.p_y.trainable_variables + self.q_y.trainable_variables

    def flatten(self, x):
        """[B, *image_shape] or [B, D] -> float32 [B, D]."""
        return tf.reshape(tf.cast(x, tf.float32), [-1, self.data_dim])

    def clusters(self, sample_ndims: int):
        """The K one-hot values of y, shaped [K, 1 (x sample_ndims), K] for broadcasting."""
        return tf.reshape(tf.eye(self.num_clusters), [self.num_clusters]
                          + [1] * sample_ndims + [self.num_clusters])

    def _seed(self, seed):
        """A stateless TFP seed: the one given, or the next of the model's stream."""
        if seed is None:
            seed = self.seed_generator.next()
        return tf.cast(seed, tf.int32)

    @staticmethod
    def _draw(dist, seed, sample_shape=(), row_independent: bool = False):
        """z ~ dist (a diagonal Gaussian whose last batch axis is the examples B), [*sample_shape,
        *batch, d]. `row_independent`: z = mu + sigma eps with one eps for every example
        ([..., 1, d], broadcast over B), so that an example's draws do not depend on the batch
        it is in (the serving signatures)."""
        if not row_independent:
            return dist.sample(sample_shape, seed=seed)
        batch = tf.shape(dist.mean())[:-1]
        leading = tf.concat([tf.convert_to_tensor(sample_shape, tf.int32), batch[:-1]], 0)
        return dist.mean() + dist.stddev() * CaGeM._row_noise(
            leading, tf.shape(dist.mean())[-1], seed)

    @staticmethod
    def _row_noise(leading, dim, seed):
        """Standard-normal eps [*leading, 1, dim] of the row-independent draws: one draw for
        every example, broadcast over the examples' axis B."""
        return tf.random.stateless_normal(tf.concat([leading, [1], [dim]], 0), seed)

    @property
    def reports_bits(self) -> bool:
        """Whether likelihoods are also given in bits per dimension: for 8-bit data."""
        return self.spec.likelihood == "discretized_logistic"

    @property
    def max_iw_chunk(self) -> int:
        """The most importance samples per chunk: a convolutional p(x|y,z1) holds feature maps
        per sample (K x chunk x B of them), a Dense one only D values."""
        return 10 if self.spec.architecture == "conv" else 1 << 30

    def q_z2_inputs(self, y, z1, x):
        """The inputs of q(z2|x,y,z1) in order: [y, z1, x], x only with the skip connection."""
        return [y, z1, x] if self.spec.skip_connection else [y, z1]

    # ----------------------------------------------------------------------------------------
    # Enumerated terms, the ELBO and the importance-weighted bound
    def x_parts(self, x, training=False, collect=True):
        """What depends on x [B,D] alone, computed once per example whatever the samples:
        q(z1|x) (batch [B], event [d1]) and the first-layer projections of x in q(y|z1,x) and
        q(z2|x,y,z1), each [B,H] (None without the skip connection)."""
        x = self.flatten(x)
        project = {"training": training, "collect": collect}
        return {"x": x, "x_observed": self.p_x.observe(x),
                "q_z1": self.q_z1.distribution([x], training=training, collect=collect),
                "q_y": self.q_y.project([None, x], **project),
                "q_z2": self.q_z2.project([None, None, x], **project)
                if self.spec.skip_connection else None}

    def latent_terms(self, x, num_samples: int | None = None, seed=None, training=False,
                     collect=True, x_parts=None, row_independent: bool = False):
        """Log-densities of one draw z1 ~ q(z1|x) [S,B,d1] and z2^y ~ q(z2|x,y,z1) for all y.

        `x_parts`: `x_parts(x)`, when the caller reuses it across draws. `row_independent`:
        the same standard-normal draws for every example (see `_draw`).
        Returns the dict described in `cagem_tf.objective` (shapes [S,B], [S,B,K], [K,S,B]).
        """
        parts = self.x_parts(x, training, collect) if x_parts is None else x_parts
        S = self.spec.num_samples if num_samples is None else num_samples
        seed_z1, seed_z2 = tfp.random.split_seed(self._seed(seed), n=2)
        q_z1 = parts["q_z1"]                                                      # batch [B]
        z1 = self._draw(q_z1, seed_z1, [S], row_independent)                     # [S,B,d1]
        q_y_logits = self.q_y([z1, None], training=training, collect=collect,
                              projected=parts["q_y"])                             # [S,B,K]
        y = self.clusters(2)                                                      # [K,1,1,K]
        q_z2 = self.q_z2.distribution(self.q_z2_inputs(y, z1, None), training=training,
                                      collect=collect,
                                      projected=parts["q_z2"])                    # batch [K,S,B]
        if self.spec.shared_noise:
            rows = tf.shape(z1)[:-1]                                              # [S,B]
            if row_independent:
                rows = tf.stack([rows[0], 1])                                     # [S,1]
            eps = tf.random.stateless_normal(tf.concat([rows, [self.spec.z2_dim]], 0), seed_z2)
            z2 = q_z2.mean() + q_z2.stddev() * eps                                # [K,S,B,d2]
        else:
            z2 = self._draw(q_z2, seed_z2, row_independent=row_independent)      # [K,S,B,d2]
        p_y = self.p_y.distribution([z2], training=training, collect=collect)   # batch [K,S,B]
        p_z1 = self.p_z1.distribution([y, z2], training=training, collect=collect)
        p_x = self.p_x.distribution([y, z1], training=training, collect=collect)  # [K,S,B]
        return {
            "z1": z1,
            "z2": z2,
            "log_q_z1": q_z1.log_prob(z1),
            "q_y_logits": q_y_logits,
            "log_q_z2": q_z2.log_prob(z2),
            "kl_z2": tfd.kl_divergence(q_z2, self.p_z2),
            "log_p_z2": self.p_z2.log_prob(z2),
            "log_p_y": p_y.log_prob(tf.range(self.num_clusters)[:, None, None]),
            "log_p_z1": p_z1.log_prob(z1),
            "log_p_x": p_x.log_prob(parts["x_observed"]),
        }

    def elbo(self, x, num_samples: int | None = None, seed=None, training=False):
        """The ELBO and its parts per example, each [B] (see `objective.elbo`)."""
        terms = self.latent_terms(x, num_samples, seed, training=training)
        return objective.elbo(terms, self.temperature)

    def sampled_terms(self, x, num_samples: int, seed=None, x_parts=None,
                      row_independent: bool = False):
        """Log-densities of one draw z1_s ~ q(z1|x), y_s ~ q(y|z1_s,x), z2_s ~ q(z2|x,y_s,z1_s),
        each [S,B]: log_q_z1, log_q_y, log_q_z2, log_p_x, log_p_z1, log_p_y, log_p_z2 (the
        terms of `objective.sampled_log_weights`). `x_parts` and `row_independent` as in
        `latent_terms`; y is then argmax(logits + Gumbel noise [S,1,K]), y ~ q(y|z1,x) too."""
        parts = self.x_parts(x) if x_parts is None else x_parts
        seed_z1, seed_y, seed_z2 = tfp.random.split_seed(self._seed(seed), n=3)
        q_z1 = parts["q_z1"]
        z1 = self._draw(q_z1, seed_z1, [num_samples], row_independent)          # [S,B,d1]
        q_y = self.q_y.distribution([z1, None], projected=parts["q_y"])           # batch [S,B]
        if row_independent:
            u = tf.random.stateless_uniform([num_samples, 1, self.num_clusters], seed_y,
                                            minval=1e-20, maxval=1.0)
            y = tf.argmax(q_y.logits - tf.math.log(-tf.math.log(u)), -1, output_type=tf.int32)
        else:
            y = q_y.sample(seed=seed_y)
        y_one_hot = tf.one_hot(y, self.num_clusters)                              # [S,B,K]
        q_z2 = self.q_z2.distribution(self.q_z2_inputs(y_one_hot, z1, None),
                                      projected=parts["q_z2"])
        z2 = self._draw(q_z2, seed_z2, row_independent=row_independent)          # [S,B,d2]
        return {"log_q_z1": q_z1.log_prob(z1), "log_q_y": q_y.log_prob(y),
                "log_q_z2": q_z2.log_prob(z2),
                "log_p_x": self.p_x.distribution([y_one_hot, z1]).log_prob(parts["x_observed"]),
                "log_p_z1": self.p_z1.distribution([y_one_hot, z2]).log_prob(z1),
                "log_p_y": self.p_y.distribution([z2]).log_prob(y),
                "log_p_z2": self.p_z2.log_prob(z2)}

    def sampled_log_weights(self, x, num_samples: int, seed=None, x_parts=None,
                            row_independent: bool = False):
        """`objective.sampled_log_weights` of `sampled_terms`: log w_s [S,B]."""
        return objective.sampled_log_weights(self.sampled_terms(x, num_samples, seed, x_parts,
                                                                row_independent))

    def iw_bound(self, x, num_samples: int = 5000, chunk_size: int | None = None, seed=None,
                 estimator: str = "exact", row_independent: bool = False):
        """log p_S(x) = log (1/S) sum_s w_s per example [B], the importance-weighted bound.

        estimator "exact" sums y inside every weight (`objective.iw_log_weights`); "sampled"
        draws y ~ q(y|z1,x) (`sampled_log_weights`): both are bounds on log p(x) in
        expectation; "sampled" costs less per sample and has more variance.
        Chunks of `chunk_size` samples are accumulated with logsumexp in a fixed-shape running
        value (samples past S in the last chunk are masked), so memory is set by the chunk and the
        loop compiles under tf.function. `chunk_size` None: `IW_CHUNK[estimator]` (it may be a
        scalar tensor). What depends on x alone (`x_parts`) is computed once, before the loop.
        `row_independent`: every example gets the same draws (see `latent_terms`), so that its
        bound does not depend on the batch it is in.
        """
        if estimator not in ("exact", "sampled"):
            raise ValueError(f"estimator {estimator!r}: use 'exact' or 'sampled'")
        chunk_size = tf.minimum(IW_CHUNK[estimator] if chunk_size is None else chunk_size,
                                self.max_iw_chunk)
        parts = self.x_parts(x)

        def log_weights(chunk, chunk_seed):                                          # [C,B]
            if estimator == "exact":
                return objective.iw_log_weights(
                    self.latent_terms(parts["x"], chunk, chunk_seed, x_parts=parts,
                                      row_independent=row_independent))
            return self.sampled_log_weights(parts["x"], chunk, chunk_seed, x_parts=parts,
                                            row_independent=row_independent)

        acc = self._sum_weights(log_weights, tf.shape(parts["x"])[:1], num_samples,
                                chunk_size, seed)
        return acc - tf.math.log(tf.cast(num_samples, tf.float32))

    def _sum_weights(self, log_weights, shape, num_samples, chunk_size: int, seed):
        """log sum_s w_s over S = `num_samples` importance samples, in chunks of `chunk_size`
        accumulated with logsumexp in a fixed-shape running value (samples past S in the last
        chunk are masked), so memory is set by the chunk and the loop compiles under
        tf.function. log_weights(C, seed) gives the log-weights of C samples, [C, *shape]."""
        num_samples = tf.convert_to_tensor(num_samples, tf.int32)
        chunk = tf.minimum(tf.cast(chunk_size, tf.int32), num_samples)
        num_chunks = (num_samples + chunk - 1) // chunk
        seed = self._seed(seed)

        def body(i, acc):
            log_w = log_weights(chunk, tf.random.experimental.stateless_fold_in(seed, i))
            index = i * chunk + tf.range(chunk)
            mask = tf.reshape(index < num_samples, tf.concat([[chunk], tf.ones_like(shape)], 0))
            log_w = tf.where(mask, log_w, -np.inf)
            return i + 1, tf.reduce_logsumexp(tf.stack([acc, tf.reduce_logsumexp(log_w, 0)]), 0)

        acc = tf.fill(shape, tf.constant(-np.inf, tf.float32))
        _, acc = tf.while_loop(lambda i, _: i < num_chunks, body, (tf.constant(0), acc))
        return acc

    def posterior_log_probs(self, x, num_samples: int = 100, chunk_size: int = 100,
                            seed=None, row_independent: bool = False):
        """log p(y|x) [B,K] of the generative model itself, by importance sampling:

        p(x,y) = E_q(z1|x) q(z2|x,y,z1)[ p(x,y,z1,z2) / (q(z1|x) q(z2|x,y,z1)) ],
        p(y|x) = p(x,y) / sum_y' p(x,y'),
        each estimated with the S samples of the exact IW bound (`objective.iw_log_weights`
        before its sum over y): consistent as S grows. Unlike the cascade of
        `class_log_probs`, which reads y from z2 through p(y|z2) alone, it weighs every y by
        how well p(x|y,z1) p(z1|y,z2) p(y|z2) explain x. `row_independent`: every example gets
        the same draws (see `latent_terms`), so that its p(y|x) does not depend on the batch.
        """
        parts = self.x_parts(x)
        chunk_size = min(chunk_size, self.max_iw_chunk)

        def log_weights(chunk, chunk_seed):                                        # [C,K,B]
            terms = self.latent_terms(parts["x"], chunk, chunk_seed, x_parts=parts,
                                      row_independent=row_independent)
            return tf.transpose(objective.iw_log_weights_per_y(terms), [1, 0, 2])

        shape = tf.stack([self.num_clusters, tf.shape(parts["x"])[0]])
        log_joint = self._sum_weights(log_weights, shape, num_samples, chunk_size, seed)
        return tf.nn.log_softmax(tf.transpose(log_joint), -1)

    # ----------------------------------------------------------------------------------------
    # Classifiers
    def class_log_probs(self, x, num_samples: int | None = None, seed=None, training=False,
                        collect=True, row_independent: bool = False):
        """Monte Carlo log q(y|x) and log p(y|x), each [B,K].

        q(y|x) = E_q(z1|x)[q(y|z1,x)];  p(y|x) ~ E_q(z1|x)[sum_c q(c|z1,x) p(y|z2^c)] with
        z2^c ~ q(z2|x,c,z1): the cascade classifier. Averages over S samples of z1.
        `row_independent`: every example gets the same standard-normal draws eps (z = mu +
        sigma eps with eps [S,1,d1] and [K,S,1,d2] broadcast over the batch), so that an
        example's answer does not depend on the batch it is in (the serving signatures).
        """
        x = self.flatten(x)
        S = self.spec.classifier_samples if num_samples is None else num_samples
        seed_z1, seed_z2 = tfp.random.split_seed(self._seed(seed), n=2)
        q_z1 = self.q_z1.distribution([x], training=training, collect=collect)
        z1 = self._draw(q_z1, seed_z1, [S], row_independent)                     # [S,B,d1]
        log_q_c = tf.nn.log_softmax(self.q_y([z1, x], training=training, collect=collect))

        def all_classes():
            q_z2 = self.q_z2.distribution(self.q_z2_inputs(self.clusters(2), z1, x),
                                          training=training, collect=collect)   # [K,S,B]
            z2 = self._draw(q_z2, seed_z2, row_independent=row_independent)      # [K,S,B,d2]
            return tf.nn.log_softmax(self.p_y([z2], training=training, collect=collect))

        if row_independent and not training:
            # Large batches one class per iteration (the same values): `_cascade_by_class`.
            rows = self.num_clusters * tf.reduce_prod(tf.shape(z1)[:-1])             # K S B
            log_p_y = tf.cond(rows > BY_CLASS_ACTIVATIONS // max(self.spec.hidden_upper),
                              lambda: self._cascade_by_class(z1, x, seed_z2), all_classes)
        else:
            log_p_y = all_classes()                                               # [K,S,B,K]
        log_q_c_first = tf.transpose(log_q_c, [2, 0, 1])[..., None]             # [K(c),S,B,1]
        log_p_cascade = tf.reduce_logsumexp(log_q_c_first + log_p_y, axis=0)    # [S,B,K]
        return objective.log_mean_exp(log_q_c), objective.log_mean_exp(log_p_cascade)

    def _cascade_by_class(self, z1, x, seed):
        """log p(y|z2^c) [K(c),S,B,K] in inference, with z2^c = mu_c + sigma_c eps_c and the
        draws eps [K,S,1,d2] of `_draw(..., row_independent=True)`: the same values, one class c
        per iteration of a loop whose iterations run at once. The projection of (z1, x) in
        q(z2|x,y,z1) is computed once for all classes. Faster for large batches than all
        [K,S,B,H] activations at once (not when the classes run one after another: measured,
        serving's `classify`, docs/performance.md)."""
        eps = self._row_noise(tf.stack([self.num_clusters, tf.shape(z1)[0]]),
                              self.spec.z2_dim, seed)                         # [K,S,1,d2]
        # Inference explicitly: batch norm's moving statistics whatever the calling context.
        inference = {"training": False, "collect": False}
        projected = self.q_z2.project(self.q_z2_inputs(None, z1, x), **inference)  # [S,B,H]

        def one_class(y_and_eps):
            y, eps_c = y_and_eps                                                 # [1,K], [S,1,d2]
            q_z2 = self.q_z2.distribution(self.q_z2_inputs(y, None, None),
                                          projected=projected, **inference)     # [S,B]
            z2 = q_z2.mean() + q_z2.stddev() * eps_c                             # [S,B,d2]
            return tf.nn.log_softmax(self.p_y([z2], **inference))

        return tf.map_fn(one_class, (self.clusters(1), eps), fn_output_signature=tf.float32)

    def classify(self, x, num_samples: int | None = None, seed=None,
                 row_independent: bool = False):
        """(p(y|x), q(y|x)) as probabilities [B,K] (`row_independent`: see
        `class_log_probs`)."""
        log_q, log_p = self.class_log_probs(x, num_samples, seed,
                                            row_independent=row_independent)
        return tf.exp(log_p), tf.exp(log_q)

    # ----------------------------------------------------------------------------------------
    # Generation and encoding
    def sample_noise(self, num_samples: int, seed=None) -> dict:
        """The standard noises of `sample` for N = `num_samples` rows, from one stateless seed:
        z2 [N,d2] and z1 [N,d1] ~ N(0, I), y [N,K] and x [N,D] ~ U(0, 1)."""
        seeds = tfp.random.split_seed(self._seed(seed), n=4)
        return {key: (tf.random.stateless_normal if key.startswith("z") else
                      tf.random.stateless_uniform)([num_samples, size], s)
                for (key, size), s in zip(self._noise_sizes().items(), tf.unstack(seeds))}

    def _noise_sizes(self) -> dict:
        """The width of each noise of `sample_noise`, in its order."""
        return {"z2": self.spec.z2_dim, "y": self.num_clusters, "z1": self.spec.z1_dim,
                "x": self.data_dim}

    def row_noise(self, seeds) -> dict:
        """`sample_noise` of one row per stateless seed (seeds int32 [N,2]): row n's noise
        depends on seeds[n] alone, so a row samples the same alone or in any batch."""
        spec = {key: tf.TensorSpec([size], tf.float32) for key, size in self._noise_sizes().items()}
        return tf.map_fn(lambda s: {k: v[0] for k, v in self.sample_noise(1, s).items()},
                         seeds, fn_output_signature=spec)

    def sample(self, num_samples: int, y=None, seed=None, z2=None, draw: bool = False,
               noise: dict | None = None):
        """Ancestral samples: z2 ~ p(z2), y ~ p(y|z2) (or the given int y [N]), z1 ~ p(z1|y,z2).

        The draws are transforms of standard noises (`sample_noise` of `seed`, or `noise`):
        z2 = eps_2, y = argmax_k(logit_k - log(-log u_k)) (Gumbel-max: y ~ Cat(softmax
        logits)), z1 = mu + sigma eps_1, x by the likelihood's inverse CDF of u_x.
        Returns (mean [N, *image_shape], y [N] int32): the means E[x|y,z1] in [0, 1] of
        p(x|y,z1) (a Bernoulli's probabilities); with `draw`, (mean, x, y) with x ~ p(x|y,z1)
        in [0, 1] too.
        """
        noise = self.sample_noise(num_samples, seed) if noise is None else noise
        if z2 is None:
            z2 = noise["z2"]                                                      # [N,d2]
        if y is None:
            gumbel = -tf.math.log(-tf.math.log(tf.clip_by_value(noise["y"], 1e-20, 1.0)))
            y = tf.argmax(self.p_y([z2]) + gumbel, -1)
        y = tf.cast(y, tf.int32)
        y_one_hot = tf.one_hot(y, self.num_clusters)
        loc, log_scale = self.p_z1([y_one_hot, z2])
        z1 = loc + tf.exp(log_scale) * noise["z1"]                                # [N,d1]
        images = lambda flat: tf.reshape(flat, [-1, *self.image_shape])
        if not draw:
            return images(self.p_x.mean([y_one_hot, z1])), y
        mean, x = self.p_x.draw([y_one_hot, z1], u=noise["x"])
        return images(mean), images(x), y

    def encode(self, x):
        """Means of q(z1|x) [B,d1] and of q(z2|x) = sum_y q(y|z1,x) q(z2|x,y,z1) [B,d2], taken at
        the mean of z1."""
        x = self.flatten(x)
        z1, _ = self.q_z1([x])
        q_y = tf.nn.softmax(self.q_y([z1, x]))                                   # [B,K]
        z2_loc, _ = self.q_z2(self.q_z2_inputs(self.clusters(1), z1, x))        # [K,B,d2]
        return z1, tf.einsum("bk,kbd->bd", q_y, z2_loc)

    def reconstruct(self, x):
        """The means in [0, 1] of p(x|z1) = sum_y q(y|z1,x) p(x|y,z1) at the mean of q(z1|x)."""
        x = self.flatten(x)
        z1, _ = self.q_z1([x])
        q_y = tf.nn.softmax(self.q_y([z1, x]))
        means = self.p_x.mean([self.clusters(1), z1])                            # [K,B,D]
        return tf.reshape(tf.einsum("bk,kbd->bd", q_y, means), [-1, *self.image_shape])

    def call(self, x, training=False):
        """The ELBO per example [B]."""
        return self.elbo(x, training=training)["elbo"]

    def float32_twin(self) -> "CaGeM":
        """This model computing in float32, holding a copy of the current weights (itself when
        it computes in float32 already): what evaluations and exports use."""
        if self.spec.precision == "float32":
            return self
        if self._twin is None:
            config = {**self.get_config(), "precision": "float32", "synchronized_bn": False}
            # Not a tracked sublayer: its variables are no part of this model's.
            object.__setattr__(self, "_twin", CaGeM(**config))
        for mine, theirs in zip(self._twin.weights, self.weights):
            mine.assign(theirs)
        return self._twin

    @contextlib.contextmanager
    def folded_batch_norm(self):
        """Inference with batch norm folded into the weights of every network
        (`Conditional.fold_batch_norm`), inside the block: the same function up to rounding,
        fewer passes over the rows. Yields the folded weights (variables), a snapshot of
        today's weights: for an export, which must track them."""
        nets = [getattr(self, name) for name in NETWORKS]
        try:
            yield [v for net in nets for v in net.fold_batch_norm()]
        finally:
            for net in nets:
                net.unfold_batch_norm()

    def checkpoint(self, positional: bool = False, skip=(), **others) -> tf.train.Checkpoint:
        """A tf.train.Checkpoint of every variable of the model (and of `others`), each under
        its path ("q_z1/input_0/kernel"; the model's own as "model/<name>"), so that a
        checkpoint restores by name whatever the order of the variables.

        Keras 3 does not expose layers kept in lists as checkpoint dependencies, so the
        variables are listed explicitly. `skip`: paths left out (newer scalars a checkpoint to
        be read does not hold); `positional`: the layout of earlier versions, a list in
        `weights` order, to read their checkpoints (`checkpoint_to_read` picks both).
        """
        kept = {p: v for p, v in self.variables_by_path().items() if p not in skip}
        if positional:
            return tf.train.Checkpoint(weights=list(kept.values()), **others)
        return tf.train.Checkpoint(variables=kept, **others)

    def checkpoint_to_read(self, path: str, **others) -> tf.train.Checkpoint:
        """`checkpoint(**others)` in the layout of the checkpoint file `path` (its prefix):
        by path, or positional for an earlier version's."""
        keys = {name for name, _ in tf.train.list_variables(path)}
        positional = any(k.startswith("weights/") for k in keys) and \
            not any(k.startswith("variables/") for k in keys)
        # Scalars newer than the checkpoint keep the value compile or a schedule gives them.
        missing = tuple(f"model/{name}" for name in NOT_IN_POSITIONAL_CHECKPOINTS
                        if positional or
                        f"variables/model.S{name}/.ATTRIBUTES/VARIABLE_VALUE" not in keys)
        return self.checkpoint(positional=positional, skip=missing, **others)

    def variables_by_path(self) -> dict:
        """{path: variable} of every variable; the model's own under "model/" rather than
        under its (instance-dependent) name."""
        own = self.name + "/"
        named = {("model/" + v.path[len(own):] if v.path.startswith(own) else v.path): v
                 for v in self.weights}
        if len(named) != len(self.weights):
            raise ValueError("two variables of the model share a path")
        return named

    def rename_clusters(self, order) -> None:
        """Gives the value c of y to the cluster that was order[c] (a permutation [K]), in
        every network and in the optimizer's moments of their variables:
          q'(c|z1,x) = q(order[c]|z1,x),    q'(z2|x,c,z1) = q(z2|x,order[c],z1),
          p'(c|z2) = p(order[c]|z2),        p'(z1|c,z2) = p(z1|order[c],z2),
          p'(x|c,z1) = p(x|order[c],z1).
        The same model with its clusters relabelled: the ELBO and every bound, which sum
        over y, are unchanged. y is a network's first input (the rows of its first kernel)
        and the classifiers' logits (the columns of their head)."""
        order = np.asarray(order, np.int64)
        if sorted(order.tolist()) != list(range(self.num_clusters)):
            raise ValueError(f"order {order.tolist()} is not a permutation of the "
                             f"{self.num_clusters} clusters")
        renamed = [(net.projections[0].kernel, 0) for net in (self.q_z2, self.p_z1, self.p_x)]
        renamed += [(v, -1) for net in (self.q_y, self.p_y)
                    for v in (net.heads[0].kernel, net.heads[0].bias)]
        slots = self.optimizer.variables if getattr(self.optimizer, "built", False) else []
        for variable, axis in renamed:
            # Keras names a slot (Adam's moments, SGD's momentum) after its variable's path.
            prefix = variable.path.replace("/", "_") + "_"
            for v in [variable] + [s for s in slots if s.name.startswith(prefix)
                                   and tuple(s.shape) == tuple(variable.shape)]:
                v.assign(tf.gather(v, order, axis=axis))

    # ----------------------------------------------------------------------------------------
    # Training
    # What every training step returns and tracks, a departure compiled in or not.
    TRACKED = ("loss", "elbo", "log_px", "kl_z1", "kl_z2", "kl_y", "batch_usage")

    def compile(self, optimizer="adam", alpha: float = 0.0, cluster_usage: bool = False,
                pseudo_labels: bool = False, z2_code: bool = False, labelled_elbo: bool = False,
                **kwargs):
        """alpha weighs the labelled cross-entropies: see `objective.alpha`.

        cluster_usage, pseudo_labels, z2_code, labelled_elbo: put the opt-in departures
        (`objective`'s weighted terms batch_usage, h_pseudo, h_z2_code, h_labelled_elbo) in
        the step; their weights are `usage_weight`, `pseudo_weight`, `code_weight` and
        `labelled_elbo_weight`. The metrics are created here, one `keras.metrics.Mean` per
        quantity the step so compiled returns, and the optimizer's variables are built (every
        variable of the model exists already), so that a saved optimizer always has them.
        """
        super().compile(optimizer=optimizer, **kwargs)
        self.optimizer.build(self.trainable_variables)
        self.alpha = float(alpha)
        self.label_weight.assign(self.alpha)
        self.cluster_usage, self.pseudo_labels = bool(cluster_usage), bool(pseudo_labels)
        self.z2_code, self.labelled_elbo = bool(z2_code), bool(labelled_elbo)
        self.terms = self._active_terms()
        names = list(self.TRACKED)
        names += ["bits_per_dim"] if self.reports_bits else []
        names += ["h_p", "h_q", "error_p", "error_q", "alpha"] if self.alpha > 0 else []
        names += [term for setting, term in DEPARTURES.items()
                  if getattr(self, setting) and term not in names]
        self.trackers = {name: keras.metrics.Mean(name=name) for name in names}

    def schedule(self, schedules, steps_per_epoch: int) -> None:
        """From now on each training step first sets every schedule's weight (`schedules`,
        `cagem_tf.schedules`) to its value at t = optimizer step / `steps_per_epoch`."""
        self.schedules, self.steps_per_epoch = tuple(schedules), int(steps_per_epoch)
        if self.schedules and self.steps_per_epoch < 1:
            raise ValueError("steps_per_epoch must be at least 1")
        self.train_function = None  # traced again with them

    def _set_scheduled_weights(self) -> None:
        if not self.schedules:
            return
        t = tf.cast(self.optimizer.iterations, tf.float64) / self.steps_per_epoch
        for schedule in self.schedules:
            variable = getattr(self, schedule.weight)
            variable.assign(tf.cast(schedule(t), variable.dtype))

    def _active_terms(self) -> tuple:
        """The weighted terms of `objective` the step computes, from the compile settings."""
        active = {"h_labelled": self.alpha > 0,
                  **{term: getattr(self, setting) for setting, term in DEPARTURES.items()}}
        return tuple(t for t in objective.WEIGHTED_TERMS if active[t.name])

    def drop_departures(self) -> bool:
        """Takes the opt-in departures out of the step once their weights are 0 for good (the
        end of their anneal): the step is retraced without their terms, so it computes the
        paper's loss alone, no longer their values and zero-weighted gradients. Returns whether
        there was one to drop."""
        if not any(getattr(self, setting) for setting in DEPARTURES):
            return False
        for setting, term in DEPARTURES.items():
            setattr(self, setting, False)
            if term not in self.TRACKED:
                self.trackers.pop(term, None)
        self.terms = self._active_terms()
        self.make_train_function(force=True)
        return True

    def get_compile_config(self):
        return {"optimizer": keras.optimizers.serialize(self.optimizer), "alpha": self.alpha,
                **{setting: getattr(self, setting) for setting in DEPARTURES}}

    def compile_from_config(self, config):
        """`compile` as it was when the model was saved (a .keras file); the optimizer's state
        is loaded after, by Keras."""
        config = dict(config)
        self.compile(keras.optimizers.deserialize(config.pop("optimizer")), **config)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Keras builds a model symbolically from a batch before `fit` under a tf.distribute
        strategy. Every variable here is built in __init__ and the losses are the model's own,
        so only the optimizer may need building (Keras' version also fails on dict batches
        under MultiWorkerMirroredStrategy, reducing them across workers)."""
        if self.optimizer is not None and not self.optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)

    @property
    def metrics(self):
        return list(self.trackers.values())

    @property
    def variable_groups(self) -> dict:
        """The variables each group of `objective.training_losses` reaches."""
        return {"all": self.trainable_variables, "classifiers": self.classifier_variables,
                "code": self.code_variables}

    def training_values(self, data, seed):
        """The scalars of one training step on `data` (see `train_step`): the batch means of
        the ELBO's parts and of its warmed-up objective, batch_usage, and the weighted terms
        of `objective` the step is compiled with, with the classifiers' batch errors."""
        seed_u, seed_l = tfp.random.split_seed(seed, n=2)
        terms = self.latent_terms(data["x"], seed=seed_u, training=True)
        parts = objective.elbo(terms, self.temperature)
        values = {name: tf.reduce_mean(parts[name])
                  for name in ("objective", "elbo", "log_px", "kl_z1", "kl_z2", "kl_y")}
        values["batch_usage"] = objective.batch_usage(terms["q_y_logits"])
        if self.reports_bits:
            values["bits_per_dim"] = objective.bits_per_dim(values["elbo"], self.data_dim)
        if self.alpha > 0 and "x_labelled" in data:
            # Batch moments normalise the labelled pass; BN statistics are not collected.
            log_q, log_p = self.class_log_probs(data["x_labelled"], self.spec.num_samples,
                                                seed_l, training=True, collect=False)
            values.update(objective.labelled_terms(log_p, log_q, data["y_labelled"]))
            values["alpha"] = tf.identity(self.label_weight)  # as this step used it
        if self.pseudo_labels and "y_pseudo" in data:
            values["h_pseudo"] = objective.cross_entropy(
                tf.nn.log_softmax(terms["q_y_logits"][0]), data["y_pseudo"])
        if self.z2_code:
            values["h_z2_code"] = objective.z2_code(terms)
        if self.labelled_elbo and "x_labelled" in data:
            # A second seed for the labelled pass's own draws; BN statistics not collected.
            labelled = self.latent_terms(data["x_labelled"], seed=tfp.random.split_seed(
                seed_l, n=2)[1], training=True, collect=False)
            values["h_labelled_elbo"] = -tf.reduce_mean(objective.labelled_elbo(
                labelled, data["y_labelled"], self.temperature))
        return values

    def train_step(self, data):
        """One step on the loss of `objective.training_losses`: -mean ELBO(x_u) (under the KL
        warm-up) + alpha (H_p + H_q)(x_l, y_l), and the opt-in departures compiled in (each
        weight annealed to 0 by a schedule, so the objective at the end is the paper's). The
        scheduled weights are set first, from the optimizer's step count (`schedule`).

        `data` is {"x": unlabelled batch} plus, with labels, "x_labelled" and "y_labelled",
        and with pseudo-labels "y_pseudo". The ELBO trains every variable; a weighted term only
        its group's (`variable_groups`). The step's noise is seeded by (seed, optimizer step):
        a run restored from a checkpoint continues the same random stream.
        """
        self._set_scheduled_weights()
        seed = tf.stack([tf.constant(self.seed or 0, tf.int32),
                         tf.cast(self.optimizer.iterations, tf.int32)])
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape(persistent=len(self.terms) > 0) as tape:
            values = self.training_values(data, seed)
            terms = [t for t in self.terms if t.name in values]  # a batch without labels
            weights = {t.weight: getattr(self, t.weight) for t in terms}
            losses = objective.training_losses(values, weights, terms)
            scaled = {group: loss / replicas for group, loss in losses.items()}  # summed
        self.optimizer.apply(self._ordered(self._gradients(tape, scaled), values),
                             self.trainable_variables)
        values["loss"] = tf.add_n(list(losses.values()))
        return self._update(values)

    def _gradients(self, tape, losses):
        """The gradient of the summed losses, each group's reaching only its variables, as a
        list in `trainable_variables` order (None: no gradient)."""
        variables = self.trainable_variables
        position = {id(v): i for i, v in enumerate(variables)}
        grads = [None] * len(variables)
        for group, loss in losses.items():
            group_variables = self.variable_groups[group]
            for v, g in zip(group_variables, tape.gradient(loss, group_variables)):
                i = position[id(v)]
                if g is not None:
                    grads[i] = g if grads[i] is None else grads[i] + g
        return grads

    @staticmethod
    def _ordered(gradients, values):
        """The gradients, made to wait for every value of the step, so that each update waits
        for every read of its variable. Without this, Grappler's dependency optimizer drops the
        edge from the labelled pass's reads of q(z1|x) and q(z2|.) (whose gradients come from
        the ELBO alone) to their updates, as implied through the all-reduce's IdentityN that it
        then splits per gradient; a read could then see the updated weights."""
        with tf.control_dependencies(list(values.values())):
            return [None if g is None else tf.identity(g) for g in gradients]

    def _update(self, values):
        """Updates the trackers with the step's values; returns their results."""
        results = {}
        for name, tracker in self.trackers.items():
            if name in values:
                tracker.update_state(values[name])
                results[name] = tracker.result()
        if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
            # Keras averages a multi-worker step's logs along axis 0: give them one.
            results = {name: tf.reshape(value, [1]) for name, value in results.items()}
        return results

    def get_config(self):
        return {**self.spec.to_dict(), "image_shape": list(self.image_shape),
                "num_clusters": self.num_clusters, "seed": self.seed,
                "synchronized_bn": self.synchronized_bn, "name": self.name}

    @classmethod
    def from_config(cls, config):
        """The model of `get_config()` (or of an earlier version's model.json: the same keys)."""
        return cls(**config)
