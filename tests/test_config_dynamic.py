"""Device TOML keys of the dynamic soft-label engine: defaults and messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from dslo_edge.config import load_config, render_config
from dslo_edge.errors import ConfigError


def write(tmp_path: Path, extra: str = "", replace: dict[str, str] | None = None):
    text = render_config("dev", tmp_path / "bundle", tmp_path / "state", 1883)
    for old, new in (replace or {}).items():
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "device.toml"
    path.write_text(text + extra)
    return path


def test_rendered_config_has_engine_defaults(tmp_path: Path) -> None:
    training = load_config(write(tmp_path)).training
    task = training.task()
    progress = training.progress_settings()
    assert progress.unit == "updates"
    assert progress.planned_rounds == 10
    assert task.monitor_decay == 0.9
    assert task.drift.threshold == 0.5
    assert task.drift.smoothing_lambda == 3.0
    assert task.drift.updates == 20
    assert task.drift.min_rows == 8
    assert task.alpha.schedule.decay == 5.0
    assert task.alpha.schedule.steps == 4


def test_config_reads_engine_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        replace={
            'progress = "updates"': 'progress = "rounds"',
            "planned_rounds = 10": "planned_rounds = 5",
            'schedule = "linear"': 'schedule = "step"',
            "steps = 4": "steps = 5",
            "drift_updates = 20": "drift_updates = 0",
            "drift_min_rows = 8": "drift_min_rows = 3",
            'hard_label_fallback = "argmax"': 'hard_label_fallback = "mask"',
        },
    )
    training = load_config(path).training
    assert training.progress_settings().value(0, 2) == 0.4
    assert training.task().alpha.schedule.kind == "step"
    assert training.task().alpha.schedule.steps == 5
    assert training.task().drift.updates == 0
    assert training.task().drift.min_rows == 3
    assert training.task().hard_label_fallback == "mask"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            'progress = "updates"',
            'progress = "epochs"',
            r"training\.progress = 'epochs' is invalid; expected 'updates' or "
            r"'rounds'",
        ),
        (
            "planned_rounds = 10",
            "planned_rounds = 0",
            r"training\.planned_rounds = 0 is invalid; expected a positive count",
        ),
        (
            'schedule = "linear"',
            'schedule = "sigmoid"',
            r"alpha\.schedule = 'sigmoid' is invalid; expected one of constant, "
            r"linear, cosine, exponential, step",
        ),
        ("decay = 5.0", "decay = 0.0", r"alpha\.decay = 0\.0 .*\(0, 100\]"),
        ("steps = 4", "steps = 0", r"alpha\.steps = 0 .*1\.\.1000"),
        ("decay = 0.9", "decay = 1.0", r"monitor\.decay = 1\.0 .*\[0, 1\)"),
        (
            "drift_threshold = 0.5",
            "drift_threshold = -1.0",
            r"monitor\.drift_threshold = -1\.0 .*nats in \(0, 100\]",
        ),
        (
            "drift_lambda = 3.0",
            "drift_lambda = 101.0",
            r"monitor\.drift_lambda = 101\.0 .*\[0, 100\]",
        ),
        (
            "drift_updates = 20",
            "drift_updates = -2",
            r"monitor\.drift_updates = -2 .*0\.\.1000000",
        ),
        (
            "drift_min_rows = 8",
            "drift_min_rows = 0",
            r"monitor\.drift_min_rows = 0 is invalid; expected a count of rows in "
            r"1\.\.1000000",
        ),
        (
            "drift_min_rows = 8",
            "drift_min_rows = 2.5",
            r"monitor\.drift_min_rows = 2\.5 is invalid; expected an integer \(a count "
            "of rows",
        ),
    ],
)
def test_config_rejects_engine_values(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    path = write(tmp_path, replace={old: new})
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_config_rejects_unknown_monitor_key(tmp_path: Path) -> None:
    path = write(tmp_path, replace={"drift_updates = 20": "drift_update = 20"})
    with pytest.raises(ConfigError, match=r"unknown key monitor\.drift_update"):
        load_config(path)
