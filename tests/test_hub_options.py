"""Hub label options: top-k payloads and private release through build_updates."""

from __future__ import annotations

import numpy as np
import pytest

from dslo_edge.bundle import load_bundle
from dslo_edge.hub import SampleSet, build_updates
from dslo_edge.models import TeacherModel
from dslo_edge.protocol import FORMAT_VERSION_TOP_K, decode_update, encode_update

pytest.importorskip("keras")


def samples(count: int) -> SampleSet:
    x = np.random.default_rng(0).random((count, 64), dtype=np.float32)
    return SampleSet(x, [f"s{i}" for i in range(count)])


def teacher(mlp_pair) -> TeacherModel:
    bundle = load_bundle(mlp_pair.bundle)
    return TeacherModel(bundle.teacher_path, bundle.teacher_output_kind)


def test_top_k_updates_decode_to_full_rows(mlp_pair) -> None:
    updates = list(
        build_updates(
            teacher(mlp_pair),
            samples(40),
            teacher_version="t",
            teacher_round=1,
            batch_size=16,
            top_k=3,
        )
    )
    assert [u.sample_count for u in updates] == [16, 16, 8]
    payload = encode_update(updates[0])
    assert payload[4] == FORMAT_VERSION_TOP_K
    decoded = decode_update(payload)
    np.testing.assert_allclose(decoded.labels.sum(axis=1), 1.0, atol=1e-5)
    top = np.argmax(updates[0].labels, axis=1)
    np.testing.assert_array_equal(np.argmax(decoded.labels, axis=1), top)


def test_private_updates_charge_the_ledger(mlp_pair, tmp_path) -> None:
    pytest.importorskip("dp_accounting")
    from dslo_edge.privacy import (
        PrivacyBudgetExceeded,
        PrivacyLedger,
        PrivacySettings,
        PrivateRelease,
    )

    settings = PrivacySettings(noise_multiplier=10.0, epsilon_budget=2.0)
    ledger = PrivacyLedger(settings, tmp_path / "ledger.json")
    release = PrivateRelease(ledger, "kitchen", np.random.default_rng(0))
    updates = build_updates(
        teacher(mlp_pair),
        samples(400),
        teacher_version="t",
        teacher_round=1,
        batch_size=10,
        privacy=release,
    )
    sent = []
    with pytest.raises(PrivacyBudgetExceeded):
        for update in updates:
            sent.append(update)

    assert sent
    assert ledger.releases("kitchen") == {10.0: 10 * len(sent)}
    assert ledger.epsilon("kitchen") <= 2.0
    assert ledger.epsilon("kitchen", 10) > 2.0
    for update in sent:
        assert update.label_kind == "probabilities"
        assert np.all(update.labels >= 0)
        np.testing.assert_allclose(update.labels.sum(axis=1), 1.0, atol=1e-5)


class LinearTeacher:
    """A float32 linear teacher whose logits overflow on extreme inputs."""

    output_kind = "logits"

    def __init__(self) -> None:
        self.weights = np.random.default_rng(1).normal(size=(64, 10))

    def predict(self, x: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            return x @ self.weights.astype(np.float32)


def test_teacher_overflow_stops_push() -> None:
    from dslo_edge.errors import ConfigError

    data = samples(40)
    data.x[37] = -3e38
    updates = build_updates(
        LinearTeacher(),  # type: ignore[arg-type]
        data,
        teacher_version="t",
        teacher_round=1,
        batch_size=16,
    )
    assert [u.sample_count for u in (next(updates), next(updates))] == [16, 16]
    with pytest.raises(ConfigError) as caught:
        next(updates)
    message = str(caught.value)
    assert "NaN or infinite labels for sample 's37'" in message
    assert message.endswith(
        "Check or rescale the inputs in the sample file; updates of earlier "
        "batches were already sent"
    )
    assert "1 of 8 samples labelled together" in message
    assert "input magnitude is 3e+38" in message
