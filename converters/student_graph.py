"""The trainable student as a ``tf.Module`` made of LiteRT builtin ops only.

TensorFlow's own gradients for these layers use ops that LiteRT runs only
through Flex (``ReluGrad``, ``BroadcastGradientArgs`` for a dynamic batch,
and others), which no pip interpreter can run. Every differentiable piece here
therefore carries a ``tf.custom_gradient`` whose backward pass is written
with plain builtin ops (matmul, mul, sum, exp), and the loss supplies its own
gradient with respect to the logits in closed form.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from converters.layers import LayerStep


@tf.custom_gradient
def dense(x: tf.Tensor, kernel: tf.Tensor, bias: tf.Tensor):  # type: ignore[no-untyped-def]
    """Compute x @ kernel + bias with a matmul-only gradient."""
    y = tf.matmul(x, kernel) + bias

    def grad(dy: tf.Tensor):  # type: ignore[no-untyped-def]
        dx = tf.matmul(dy, kernel, transpose_b=True)
        dkernel = tf.matmul(x, dy, transpose_a=True)
        return dx, dkernel, tf.reduce_sum(dy, axis=0)

    return y, grad


@tf.custom_gradient
def relu(x: tf.Tensor):  # type: ignore[no-untyped-def]
    """ReLU whose gradient is a mask product instead of the Flex ReluGrad op."""
    y = tf.maximum(x, 0.0)

    def grad(dy: tf.Tensor) -> tf.Tensor:
        return dy * tf.cast(x > 0.0, dy.dtype)

    return y, grad


@tf.custom_gradient
def sigmoid(x: tf.Tensor):  # type: ignore[no-untyped-def]
    """Sigmoid with gradient y * (1 - y) instead of the SigmoidGrad op."""
    y = tf.sigmoid(x)

    def grad(dy: tf.Tensor) -> tf.Tensor:
        return dy * y * (1.0 - y)

    return y, grad


@tf.custom_gradient
def tanh(x: tf.Tensor):  # type: ignore[no-untyped-def]
    """Tanh with gradient 1 - y^2 instead of the TanhGrad op."""
    y = tf.tanh(x)

    def grad(dy: tf.Tensor) -> tf.Tensor:
        return dy * (1.0 - y * y)

    return y, grad


def _identity(x: tf.Tensor) -> tf.Tensor:
    return x


# softmax is never applied inside the network: a final softmax is folded into
# the loss and into the probabilities output of infer.
_ACTIVATIONS: dict[str, Callable[[tf.Tensor], tf.Tensor]] = {
    "linear": _identity,
    "softmax": _identity,
    "relu": relu,
    "sigmoid": sigmoid,
    "tanh": tanh,
}


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


def weight_name(layer_name: str, part: str) -> str:
    """Return a signature-safe name for a layer weight, e.g. 'dense_1_kernel'."""
    return re.sub(r"\W", "_", f"{layer_name}_{part}")


class StudentModule(tf.Module):
    """Student network with infer, train, get_weights and set_weights signatures."""

    def __init__(self, steps: list[LayerStep], input_shape: tuple[int, ...]):
        super().__init__(name="student")
        self.steps = steps
        self.input_shape = input_shape
        self.weight_names: list[str] = []
        # Keras layers are not tracked by tf.Module, so the module owns copies.
        self.variables_list: list[tf.Variable] = []
        for step in steps:
            for part, value in zip(("kernel", "bias"), step.weights, strict=False):
                name = weight_name(step.name, part)
                self.weight_names.append(name)
                self.variables_list.append(tf.Variable(value, name=name))
        self.class_count = int(self.variables_list[-1].shape[0])

    def logits(self, x: tf.Tensor) -> tf.Tensor:
        index = 0
        for step in self.steps:
            if step.kind == "flatten":
                x = tf.reshape(x, [tf.shape(x)[0], -1])
            elif step.kind == "dense":
                kernel, bias = self.variables_list[index : index + 2]
                index += 2
                x = dense(x, kernel, bias)
            x = _ACTIVATIONS[step.activation](x)
        return x

    def _x_spec(self) -> tf.TensorSpec:
        return tf.TensorSpec([None, *self.input_shape], tf.float32, name="x")

    def signatures(self) -> dict[str, object]:
        """Build the concrete functions to export, keyed by signature name."""
        k = self.class_count
        infer = tf.function(self._infer).get_concrete_function(self._x_spec())
        train = tf.function(self._train).get_concrete_function(
            self._x_spec(),
            tf.TensorSpec([None, k], tf.float32, name="soft"),
            tf.TensorSpec([None], tf.int32, name="hard"),
            tf.TensorSpec([None], tf.float32, name="alpha"),
            tf.TensorSpec([], tf.float32, name="temperature"),
            tf.TensorSpec([], tf.float32, name="learning_rate"),
        )
        get_weights = tf.function(self._get_weights).get_concrete_function()
        return {
            "infer": infer,
            "train": train,
            "get_weights": get_weights,
            "set_weights": self._set_weights_function(),
        }

    def _infer(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        z = self.logits(x)
        return {"logits": z, "probabilities": tf.nn.softmax(z)}

    def _train(self, x, soft, hard, alpha, temperature, learning_rate):  # type: ignore[no-untyped-def]
        with tf.GradientTape() as tape:
            z = self.logits(x)
            loss = distillation_loss(z, soft, hard, alpha, temperature)
        grads = tape.gradient(loss, self.variables_list)
        for variable, grad in zip(self.variables_list, grads, strict=True):
            variable.assign_sub(learning_rate * grad)
        return {"loss": loss}

    def _get_weights(self) -> dict[str, tf.Tensor]:
        return {
            name: variable.read_value()
            for name, variable in zip(
                self.weight_names, self.variables_list, strict=True
            )
        }

    def _set_weights_function(self) -> object:
        names = list(self.weight_names)
        variables = list(self.variables_list)

        def set_weights(**weights: tf.Tensor) -> dict[str, tf.Tensor]:
            for name, variable in zip(names, variables, strict=True):
                variable.assign(weights[name])
            return {"assigned": tf.constant(len(names), tf.int32)}

        # tf.function reads argument names from the signature, and LiteRT
        # signature inputs take those names.
        set_weights.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in names]
        )
        specs = {
            name: tf.TensorSpec(variable.shape, tf.float32, name=name)
            for name, variable in zip(names, variables, strict=True)
        }
        return tf.function(set_weights).get_concrete_function(**specs)


def initial_weights(module: StudentModule) -> dict[str, np.ndarray]:
    """Return the module's current weights by name."""
    return {
        name: variable.numpy()
        for name, variable in zip(
            module.weight_names, module.variables_list, strict=True
        )
    }
