"""The dynamic distillation loss with a closed-form gradient for the logits.

Per sample: alpha * T^2 * KL(soft || softmax(z / T))
+ (1 - alpha) * CE(hard, softmax(z)); both terms are summed over classes and
the result is averaged over the batch. Writing the gradient by hand keeps the
backward pass free of ops that LiteRT would need Flex for.
"""

from __future__ import annotations

import tensorflow as tf


def log_softmax(z: tf.Tensor) -> tf.Tensor:
    """Numerically stable log-softmax over the last axis."""
    shifted = z - tf.stop_gradient(tf.reduce_max(z, axis=-1, keepdims=True))
    return shifted - tf.math.log(tf.reduce_sum(tf.exp(shifted), axis=-1, keepdims=True))


def distillation_loss(  # type: ignore[no-untyped-def]
    logits: tf.Tensor,
    soft: tf.Tensor,
    hard: tf.Tensor,
    alpha: tf.Tensor,
    temperature: tf.Tensor,
):
    """Return the batch-mean dynamic distillation loss and its logit gradient.

    Per sample: alpha * T^2 * KL(soft || softmax(z / T))
    + (1 - alpha) * CE(hard, softmax(z)); both terms are summed over classes.
    A hard label of -1 has an all-zero one-hot row, so its CE term and its
    gradient are both zero.
    """
    class_count = logits.shape[-1]

    @tf.custom_gradient
    def loss_of(z: tf.Tensor):  # type: ignore[no-untyped-def]
        log_q_t = log_softmax(z / temperature)
        log_q = log_softmax(z)
        safe_soft = tf.maximum(soft, 1e-30)
        soft_log_soft = tf.where(soft > 0.0, soft * tf.math.log(safe_soft), 0.0)
        kl = tf.reduce_sum(soft_log_soft - soft * log_q_t, axis=-1)
        one_hot = tf.one_hot(hard, class_count, dtype=tf.float32)
        ce = -tf.reduce_sum(one_hot * log_q, axis=-1)
        t_squared = temperature * temperature
        loss = tf.reduce_mean(alpha * t_squared * kl + (1.0 - alpha) * ce)

        def grad(upstream: tf.Tensor) -> tf.Tensor:
            # d/dz of T^2 KL(s || softmax(z/T)) is T (softmax(z/T) sum(s) - s);
            # d/dz of CE is softmax(z) sum(onehot) - onehot.
            batch = tf.cast(tf.shape(z)[0], tf.float32)
            a = tf.expand_dims(alpha, -1)
            soft_mass = tf.reduce_sum(soft, axis=-1, keepdims=True)
            hard_mass = tf.reduce_sum(one_hot, axis=-1, keepdims=True)
            g_kl = temperature * (tf.exp(log_q_t) * soft_mass - soft)
            g_ce = tf.exp(log_q) * hard_mass - one_hot
            return upstream * (a * g_kl + (1.0 - a) * g_ce) / batch

        return loss, grad

    return loss_of(logits)
