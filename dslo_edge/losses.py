"""The DSL-O loss in numpy, the reference for the exported ``train`` signature.

Per sample i, with student logits ``z``, smoothed target ``s`` and weight
``alpha``::

    L_i = alpha_i * T^2 * KL(s_i || softmax(z_i / T))
          + (1 - alpha_i) * CE(y_i, softmax(z_i))

KL and CE are summed over classes and the loss is the batch mean. A hard
label of -1 drops the CE term of its sample. The converter writes the same
formula and the same closed-form gradient into the LiteRT graph, and the
tests compare the two on golden values.
"""

from __future__ import annotations

import numpy as np


def log_softmax(z: np.ndarray) -> np.ndarray:
    """Return log softmax over the last axis, stable for large logits."""
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def kl_divergence(p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """Return KL(p || q) per row from ``p`` and ``log q``, with 0 log 0 = 0."""
    log_p = np.log(np.where(p > 0, p, 1.0))
    return np.sum(np.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def distillation_loss(
    logits: np.ndarray,
    soft: np.ndarray,
    hard: np.ndarray,
    alpha: np.ndarray,
    temperature: float,
) -> tuple[float, np.ndarray]:
    """Return the batch-mean DSL-O loss and its gradient with respect to ``logits``.

    Args:
        logits: student logits, shape (N, K).
        soft: target probabilities, shape (N, K).
        hard: class indices, shape (N,); -1 masks the CE term of that sample.
        alpha: distillation weight per sample, shape (N,).
        temperature: softmax temperature T > 0 of the distillation term.

    Returns:
        The loss as a float (computed in float64) and the gradient, shape (N, K).

    Raises:
        ValueError: shapes disagree or ``temperature`` is not positive.
    """
    z = np.asarray(logits, dtype=np.float64)
    s = np.asarray(soft, dtype=np.float64)
    labels = np.asarray(hard, dtype=np.int64)
    weights = np.asarray(alpha, dtype=np.float64)
    if z.ndim != 2 or s.shape != z.shape or labels.shape != (z.shape[0],):
        raise ValueError(
            f"expected logits and soft of one shape (N, K) and hard of shape (N,), "
            f"got {z.shape}, {s.shape} and {labels.shape}"
        )
    if weights.shape != labels.shape:
        raise ValueError(f"alpha has shape {weights.shape}, expected {labels.shape}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")

    log_q_t = log_softmax(z / temperature)
    log_q = log_softmax(z)
    one_hot = np.zeros_like(z)
    has_label = labels >= 0
    one_hot[np.flatnonzero(has_label), labels[has_label]] = 1.0
    kl = kl_divergence(s, log_q_t)
    ce = -np.sum(one_hot * log_q, axis=1)
    t_squared = temperature * temperature
    loss = float(np.mean(weights * t_squared * kl + (1.0 - weights) * ce))

    # d/dz of T^2 KL(s || softmax(z/T)) is T (softmax(z/T) sum(s) - s), and
    # d/dz of CE is softmax(z) sum(onehot) - onehot.
    soft_mass = s.sum(axis=1, keepdims=True)
    hard_mass = one_hot.sum(axis=1, keepdims=True)
    grad_kl = temperature * (np.exp(log_q_t) * soft_mass - s)
    grad_ce = np.exp(log_q) * hard_mass - one_hot
    a = weights[:, None]
    grad = (a * grad_kl + (1.0 - a) * grad_ce) / z.shape[0]
    return loss, grad
