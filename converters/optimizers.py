"""Optimizers that run inside the ``train`` signature.

Each update rule follows the Keras 3 optimizer of the same name step for step
(same slot initialisation, bias correction and epsilon placement), so a train
step in the interpreter matches ``keras.optimizers.X.apply`` on the same
gradients. The slots are variables exported by ``get_weights`` and imported
by ``set_weights``, which is what lets a restored checkpoint resume exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import tensorflow as tf

from dslo_edge.errors import ConversionError

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")

STATE_PREFIX = "optimizer__"
"""Prefix of every exported optimizer tensor, e.g. ``optimizer__m__dense_kernel``."""


@dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer choice and hyperparameters (Keras 3 names and defaults).

    The learning rate is not here: it is an input of the ``train`` signature.

    Attributes:
        name: "sgd", "momentum" (SGD with momentum), "adam" or "adamw".
        momentum: momentum factor for "momentum".
        nesterov: Nesterov momentum for "momentum".
        beta_1: decay of the first-moment estimate for Adam/AdamW.
        beta_2: decay of the second-moment estimate for Adam/AdamW.
        epsilon: added to sqrt(v) in Adam/AdamW.
        weight_decay: decoupled weight decay for AdamW, applied to every
            trained weight as ``w -= w * weight_decay * learning_rate``.
        clip_global_norm: rescale all gradients together so their global L2
            norm is at most this value; None disables clipping.
    """

    name: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7
    weight_decay: float = 0.004
    clip_global_norm: float | None = None

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConversionError(
                f"unknown optimizer '{self.name}'; expected one of "
                f"{', '.join(OPTIMIZERS)}"
            )
        if self.clip_global_norm is not None and self.clip_global_norm <= 0:
            raise ConversionError(
                f"clip_global_norm must be positive, got {self.clip_global_norm}"
            )

    def manifest_entry(self) -> dict[str, object]:
        """Return the settings that apply to this optimizer, for the manifest."""
        used = {"name", "clip_global_norm"}
        if self.name == "momentum":
            used |= {"momentum", "nesterov"}
        if self.name in ("adam", "adamw"):
            used |= {"beta_1", "beta_2", "epsilon"}
        if self.name == "adamw":
            used.add("weight_decay")
        return {key: value for key, value in asdict(self).items() if key in used}


def _slots(config: OptimizerConfig) -> tuple[str, ...]:
    if config.name == "momentum":
        return ("momentum",)
    if config.name in ("adam", "adamw"):
        return ("m", "v")
    return ()


class GraphOptimizer:
    """Slot variables and the update rule for a list of trained weights."""

    def __init__(self, config: OptimizerConfig, weights: list[tuple[str, tf.Variable]]):
        self.config = config
        self.weights = weights
        self.slots: dict[str, list[tf.Variable]] = {}
        self.state: list[tuple[str, tf.Variable]] = []
        for slot in _slots(config):
            self.slots[slot] = []
            for name, variable in weights:
                state_name = f"{STATE_PREFIX}{slot}__{name}"
                zeros = tf.zeros(variable.shape, tf.float32)
                slot_variable = tf.Variable(zeros, name=state_name)
                self.slots[slot].append(slot_variable)
                self.state.append((state_name, slot_variable))
        self.iterations: tf.Variable | None = None
        if config.name in ("adam", "adamw"):
            # float32 counts steps exactly up to 2**24 (about 16.7 million).
            self.iterations = tf.Variable(0.0, name=f"{STATE_PREFIX}iterations")
            self.state.append((f"{STATE_PREFIX}iterations", self.iterations))

    def apply(self, grads: list[tf.Tensor], learning_rate: tf.Tensor) -> None:
        """Update every weight from its gradient."""
        if self.config.clip_global_norm is not None:
            grads = clip_by_global_norm(grads, self.config.clip_global_norm)
        variables = [variable for _, variable in self.weights]
        if self.config.name == "adamw":
            decay = self.config.weight_decay * learning_rate
            for variable in variables:
                variable.assign_sub(variable * decay)
        if self.config.name == "sgd":
            for variable, grad in zip(variables, grads, strict=True):
                variable.assign_sub(learning_rate * grad)
        elif self.config.name == "momentum":
            self._apply_momentum(variables, grads, learning_rate)
        else:
            self._apply_adam(variables, grads, learning_rate)

    def _apply_momentum(
        self, variables: list[tf.Variable], grads: list[tf.Tensor], rate: tf.Tensor
    ) -> None:
        momentum = self.config.momentum
        for variable, grad, velocity in zip(
            variables, grads, self.slots["momentum"], strict=True
        ):
            velocity.assign(velocity * momentum - grad * rate)
            if self.config.nesterov:
                variable.assign_add(velocity * momentum - grad * rate)
            else:
                variable.assign_add(velocity)

    def _apply_adam(
        self, variables: list[tf.Variable], grads: list[tf.Tensor], rate: tf.Tensor
    ) -> None:
        assert self.iterations is not None
        beta_1, beta_2 = self.config.beta_1, self.config.beta_2
        step = self.iterations + 1.0
        beta_1_power = tf.pow(tf.constant(beta_1), step)
        beta_2_power = tf.pow(tf.constant(beta_2), step)
        alpha = rate * tf.sqrt(1.0 - beta_2_power) / (1.0 - beta_1_power)
        for variable, grad, m, v in zip(
            variables, grads, self.slots["m"], self.slots["v"], strict=True
        ):
            m.assign_add((grad - m) * (1.0 - beta_1))
            v.assign_add((grad * grad - v) * (1.0 - beta_2))
            variable.assign_sub(alpha * m / (tf.sqrt(v) + self.config.epsilon))
        self.iterations.assign(step)


def clip_by_global_norm(grads: list[tf.Tensor], clip_norm: float) -> list[tf.Tensor]:
    """Scale gradients by clip_norm / max(global_norm, clip_norm), as Keras does.

    ``tf.clip_by_global_norm`` lowers to the same builtins, but writing it out
    keeps its gradient-free graph small and obvious.
    """
    squares = [tf.reduce_sum(grad * grad) for grad in grads]
    norm = tf.sqrt(tf.add_n(squares))
    scale = clip_norm / tf.maximum(norm, clip_norm)
    return [grad * scale for grad in grads]
