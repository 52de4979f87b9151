"""The hub labels for a two-head student and the daemon trains on its updates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dslo_edge.bundle import load_bundle
from dslo_edge.daemon import EdgeDaemon
from dslo_edge.errors import ConfigError
from dslo_edge.hub import SampleSet, push
from dslo_edge.hub_multihead import (
    MultiHeadTeacherModel,
    build_multi_head_updates,
    head_output_kinds,
)
from dslo_edge.models import StudentModel
from tests.multihead_bundle import HEADS, two_head_teacher
from tests.test_daemon import DEVICE, write_config

pytestmark = pytest.mark.slow

SAMPLES = 20


def _samples() -> SampleSet:
    x = np.random.default_rng(0).random((SAMPLES, 64), dtype=np.float32)
    return SampleSet(x, [f"h{i}" for i in range(SAMPLES)])


@pytest.fixture(scope="module")
def second_round(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second teacher snapshot for the two-head student."""
    import keras

    from converters.bundle import convert_teacher

    keras.utils.set_random_seed(12)
    path = tmp_path_factory.mktemp("round-2") / "teacher-r2.tflite"
    return convert_teacher(two_head_teacher(), path)


def test_converted_teacher_outputs_each_head(
    two_head_bundle: Path, second_round: Path
) -> None:
    kinds = head_output_kinds(load_bundle(two_head_bundle).manifest)
    teacher = MultiHeadTeacherModel(second_round, kinds)

    outputs = teacher.predict(_samples().x[:5])

    assert kinds == {"digit": "probabilities", "shape": "probabilities"}
    for name, classes in HEADS.items():
        assert outputs[name].shape == (5, classes)
        np.testing.assert_allclose(outputs[name].sum(axis=1), 1.0, atol=1e-5)


def test_updates_carry_top_k_per_head(two_head_bundle: Path) -> None:
    bundle = load_bundle(two_head_bundle)
    teacher = MultiHeadTeacherModel(
        bundle.teacher_path, head_output_kinds(bundle.manifest)
    )

    updates = list(
        build_multi_head_updates(
            teacher,
            _samples(),
            teacher_version="r1",
            teacher_round=1,
            batch_size=8,
            top_k=3,
        )
    )

    assert [update.sample_count for update in updates] == [8, 8, 4]
    assert updates[0].heads["digit"].top_k == 3
    # Three classes are not more than k = 3, so the head gets full labels.
    assert updates[0].heads["shape"].top_k is None
    assert updates[2].sample_ids == ["h16", "h17", "h18", "h19"]


class OverflowingTwoHeadTeacher:
    """A fake two-head teacher whose float32 ``shape`` logits overflow."""

    output_kinds = {"digit": "probabilities", "shape": "logits"}

    def predict(self, x: np.ndarray) -> dict[str, np.ndarray]:
        weights = np.random.default_rng(1).normal(size=(64, 3)).astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            shape = x @ weights
        return {"digit": np.full((len(x), 10), 0.1, np.float32), "shape": shape}


def test_teacher_overflow_stops_multi_head_push() -> None:
    samples = _samples()
    samples.x[13] = 3e38

    updates = build_multi_head_updates(
        OverflowingTwoHeadTeacher(),  # type: ignore[arg-type]
        samples,
        teacher_version="r1",
        teacher_round=1,
        batch_size=8,
    )

    assert next(updates).sample_ids[0] == "h0"
    with pytest.raises(ConfigError) as caught:
        next(updates)
    message = str(caught.value)
    assert message.startswith("head shape: the teacher gave NaN or infinite labels")
    assert "sample 'h13' (1 of 8 samples labelled together)" in message
    assert "input magnitude is 3e+38" in message
    assert message.endswith(
        "Check or rescale the inputs in the sample file; updates of earlier "
        "batches were already sent"
    )


def test_push_trains_two_head_daemon(
    two_head_bundle: Path, second_round: Path, broker_factory, tmp_path: Path
) -> None:
    broker = broker_factory("mosquitto")
    config = write_config(tmp_path, two_head_bundle, broker)
    bundle = load_bundle(two_head_bundle)
    factory = StudentModel(bundle).get_weights()
    daemon = EdgeDaemon(config)
    daemon.start()
    try:
        result = push(
            [bundle.teacher_path, second_round],
            "probabilities",
            _samples(),
            DEVICE,
            f"mqtt://{broker.host}:{broker.port}",
            batch_size=8,
            timeout=30.0,
            top_k=2,
            head_output_kinds=head_output_kinds(bundle.manifest),
        )
        trained = daemon.student.get_weights()
    finally:
        daemon.stop()

    assert result.rounds == 2
    assert result.messages == 6
    assert result.samples == 2 * SAMPLES
    assert result.device_metrics["applied"] == 6
    assert result.device_metrics["rejected"] == {}
    assert result.device_metrics["teacher"]["shape"]["latest_round"] == 2.0
    assert any(not np.array_equal(trained[n], factory[n]) for n in factory)


def test_push_rejects_privacy_for_heads(two_head_bundle: Path, tmp_path) -> None:
    pytest.importorskip("dp_accounting")
    from dslo_edge.privacy import PrivacyLedger, PrivacySettings, PrivateRelease

    settings = PrivacySettings(noise_multiplier=10.0, epsilon_budget=2.0)
    ledger = PrivacyLedger(settings, tmp_path / "ledger.json")
    release = PrivateRelease(ledger, DEVICE, np.random.default_rng(0))

    with pytest.raises(ConfigError, match="single-head students only"):
        push(
            [load_bundle(two_head_bundle).teacher_path],
            "probabilities",
            _samples(),
            DEVICE,
            "mqtt://127.0.0.1:1",
            privacy=release,
            head_output_kinds={"digit": "probabilities", "shape": "probabilities"},
        )


def _head_labels() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {
        f"y_{name}": rng.integers(0, classes, SAMPLES, dtype=np.int32)
        for name, classes in HEADS.items()
    }


def test_updates_carry_hard_labels_per_head(two_head_bundle: Path) -> None:
    bundle = load_bundle(two_head_bundle)
    teacher = MultiHeadTeacherModel(
        bundle.teacher_path, head_output_kinds(bundle.manifest)
    )
    labels = _head_labels()
    samples = SampleSet(
        _samples().x,
        [f"h{i}" for i in range(SAMPLES)],
        head_y={name: labels[f"y_{name}"] for name in HEADS},
    )

    updates = list(
        build_multi_head_updates(
            teacher, samples, teacher_version="r1", teacher_round=1, batch_size=8
        )
    )

    for name in HEADS:
        sent = np.concatenate([update.heads[name].hard_labels for update in updates])
        np.testing.assert_array_equal(sent, labels[f"y_{name}"])
        assert sent.dtype == np.int32


def test_push_command_sends_head_hard_labels(
    two_head_bundle: Path, broker_factory, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from dslo_edge.cli import main
    from dslo_edge.multihead_decode import decode_multi_head_update
    from tests.test_hub_service import device_updates

    broker = broker_factory("mosquitto")
    labels = _head_labels()
    data = tmp_path / "samples.npz"
    np.savez(data, x=_samples().x, **labels)
    config = write_config(tmp_path, two_head_bundle, broker)
    daemon = EdgeDaemon(config)
    daemon.start()
    client, received = device_updates(broker.port, DEVICE)
    try:
        result = CliRunner().invoke(
            main,
            [
                "push",
                "--bundle",
                str(two_head_bundle),
                "--data",
                str(data),
                "--device",
                DEVICE,
                "--broker",
                f"mqtt://{broker.host}:{broker.port}",
                "--batch-size",
                "8",
                "--hard-labels",
            ],
        )
        applied = daemon.metrics.applied
        rejected = dict(daemon.metrics.rejected)
    finally:
        client.disconnect()
        client.loop_stop()
        daemon.stop()

    assert result.exit_code == 0, result.output
    assert "applied 3" in result.output
    assert applied == 3
    assert rejected == {}
    updates = [decode_multi_head_update(received.get(timeout=5)) for _ in range(3)]
    for name in HEADS:
        sent = np.concatenate([update.heads[name].hard_labels for update in updates])
        np.testing.assert_array_equal(sent, labels[f"y_{name}"])


@pytest.mark.parametrize(
    ("arrays", "expected"),
    [
        (
            {"y": np.zeros(SAMPLES, np.int32)},
            "has a single y, but the student has several heads; expected one "
            "label array per head of the student (y_digit, y_shape), written by "
            "numpy.savez(path, x=x, y_digit=..., y_shape=...), and no y",
        ),
        ({"y_digit": np.zeros(SAMPLES, np.int32)}, "lacks y_shape; expected one"),
        (
            {**_head_labels(), "y_colour": np.zeros(SAMPLES, np.int32)},
            "has y_colour, which names no head of the student; expected one",
        ),
        (
            {**_head_labels(), "y_shape": np.full(SAMPLES, 3, np.int32)},
            "y_shape[0] is 3; expected a class index 0..2 of head 'shape', or -1 "
            "for a sample without a hard label (invalid labels: 20 of 20)",
        ),
        (
            {**_head_labels(), "y_digit": np.full(SAMPLES, 1.5)},
            "y_digit[0] is 1.5; expected a whole class index",
        ),
    ],
    ids=["single-y", "missing-head", "unknown-head", "out-of-range", "fraction"],
)
def test_push_command_rejects_bad_head_labels(
    two_head_bundle: Path, tmp_path: Path, arrays: dict, expected: str
) -> None:
    from click.testing import CliRunner

    from dslo_edge.cli import main

    data = tmp_path / "samples.npz"
    np.savez(data, x=_samples().x, **arrays)
    arguments = ["push", "--bundle", str(two_head_bundle), "--data", str(data)]
    arguments += ["--device", DEVICE, "--broker", "mqtt://127.0.0.1:1"]

    result = CliRunner().invoke(main, [*arguments, "--hard-labels"])

    assert result.exit_code == 78
    assert f"invalid --data: {data}" in result.output
    assert expected in " ".join(result.output.split())


def test_push_rejects_top_k_above_heads(two_head_bundle: Path, tmp_path) -> None:
    from click.testing import CliRunner

    from dslo_edge.cli import main

    data = tmp_path / "samples.npz"
    np.savez(data, x=_samples().x)
    arguments = ["push", "--bundle", str(two_head_bundle), "--data", str(data)]
    arguments += ["--device", DEVICE, "--broker", "mqtt://127.0.0.1:1", "--no-wait"]

    result = CliRunner().invoke(main, [*arguments, "--top-k", "10"])

    assert result.exit_code == 78
    assert "--top-k is 10, but no head of the bundle's student" in result.output
    assert "(digit 10, shape 3)" in result.output
    assert "expected 1 to 9" in result.output


def test_push_command_rejects_private_labels(
    two_head_bundle: Path, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from dslo_edge.cli import main

    data = tmp_path / "samples.npz"
    np.savez(data, x=_samples().x)
    ledger = tmp_path / "ledger.json"
    arguments = ["push", "--bundle", str(two_head_bundle), "--data", str(data)]
    arguments += ["--device", DEVICE, "--broker", "mqtt://127.0.0.1:1"]
    arguments += ["--dp-noise-multiplier", "1", "--dp-epsilon", "8"]

    result = CliRunner().invoke(main, [*arguments, "--dp-ledger", str(ledger)])

    output = " ".join(result.output.split())
    assert result.exit_code == 78
    assert f"the student of {two_head_bundle} has several heads" in output
    assert "(digit, shape)" in output
    assert "drop the --dp-* options" in output
    assert not ledger.exists()
