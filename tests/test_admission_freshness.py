"""The freshness checks of an update, and the numbers in their messages."""

from __future__ import annotations

import numpy as np
import pytest

from dslo_edge.admission import CLOCK_SKEW, STALE, check_new_and_fresh
from dslo_edge.applied_ids import AppliedIds
from dslo_edge.config import TrainingSettings
from dslo_edge.errors import InvalidUpdate
from dslo_edge.protocol import SoftLabelUpdate

PUBLISHED_AT = 1_718_000_000.0


def update_at(timestamp: float) -> SoftLabelUpdate:
    return SoftLabelUpdate(
        message_id=bytes(range(16)),
        teacher_version="t1",
        teacher_round=1,
        timestamp=timestamp,
        sample_ids=["s0"],
        inputs=np.zeros((1, 4), np.float32),
        labels=np.array([[0.5, 0.5]], np.float32),
        label_kind="probabilities",
    )


def rejection(received_at: float, settings: TrainingSettings) -> InvalidUpdate:
    with pytest.raises(InvalidUpdate) as caught:
        check_new_and_fresh(
            update_at(PUBLISHED_AT), received_at, AppliedIds(10), settings
        )
    return caught.value


def test_stale_message_shows_subsecond_limit() -> None:
    error = rejection(PUBLISHED_AT + 0.004, TrainingSettings(max_age_s=0.001))

    assert error.reason == STALE
    assert "published 0.004 s ago" in str(error)
    assert "max_age_s = 0.001" in str(error)


def test_stale_message_keeps_whole_seconds() -> None:
    error = rejection(PUBLISHED_AT + 3700.4, TrainingSettings())

    assert error.reason == STALE
    assert "published 3700 s ago, older than max_age_s = 3600" in str(error)


def test_clock_skew_message_names_limit() -> None:
    error = rejection(PUBLISHED_AT - 0.25, TrainingSettings(max_clock_skew_s=0.1))

    assert error.reason == CLOCK_SKEW
    assert "timestamp is 0.25 s in the future" in str(error)
    assert "max_clock_skew_s = 0.1" in str(error)


def test_fresh_update_within_limits_passes() -> None:
    settings = TrainingSettings(max_age_s=0.5, max_clock_skew_s=0.5)

    check_new_and_fresh(
        update_at(PUBLISHED_AT), PUBLISHED_AT + 0.4, AppliedIds(10), settings
    )
