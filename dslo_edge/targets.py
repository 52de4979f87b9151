"""The training targets that the dynamic part hands to the train step."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class Targets:
    """Training targets of one head for the train step, plus figures for metrics.

    Attributes:
        soft: smoothed teacher targets, float32 (N, K).
        hard: class index per sample, int32 (N,); -1 masks the CE term.
        alpha: distillation weight per sample, float32 (N,).
        temperature: softmax temperature of the distillation term.
        smoothing_lambda: lambda used for this batch (boosted or not).
        progress: t used for the alpha time term.
        batch_drift: the monitor's drift for this batch, None without
            samples seen in an earlier round.
        dynamic_ms: time spent in entropy, monitor, smoothing and alpha.
    """

    soft: np.ndarray
    hard: np.ndarray
    alpha: np.ndarray
    temperature: float
    smoothing_lambda: float
    progress: float
    batch_drift: float | None
    dynamic_ms: float
