"""Adam whose update is TensorFlow's fused kernel.

Keras' Adam (3.x) writes the update of each variable as eight elementwise ops,

    m <- m + (g - m)(1 - beta_1)          v <- v + (g^2 - v)(1 - beta_2)
    theta <- theta - lr_t m / (sqrt(v) + epsilon),  lr_t = lr sqrt(1 - beta_2^t) / (1 - beta_1^t),

each a pass over memory: at paper size (7.2M parameters) they were the largest elementwise cost
of the train step on the CPU. `ResourceApplyAdam` computes the same three lines in one pass. The
slots (momentums, velocities), their names and the step count are Keras', so checkpoints of
either optimizer restore into the other; sparse gradients and amsgrad take Keras' path.
"""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="cagem_tf")
class Adam(keras.optimizers.Adam):
    """`keras.optimizers.Adam`, the dense update computed by `tf.raw_ops.ResourceApplyAdam`."""

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad or isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable, learning_rate)
        index = self._get_variable_index(variable)
        target = variable.value if isinstance(variable, keras.Variable) else variable
        dtype = target.dtype

        def constant(value):
            return tf.cast(value, dtype)

        step = constant(self.iterations + 1)
        tf.raw_ops.ResourceApplyAdam(
            var=target.handle, m=self._momentums[index].value.handle,
            v=self._velocities[index].value.handle,
            beta1_power=tf.pow(constant(self.beta_1), step),
            beta2_power=tf.pow(constant(self.beta_2), step),
            lr=constant(learning_rate), beta1=constant(self.beta_1),
            beta2=constant(self.beta_2), epsilon=constant(self.epsilon),
            grad=constant(gradient))
