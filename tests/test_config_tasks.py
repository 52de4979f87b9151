"""The [training.tasks.<head>] tables of the device config."""

from __future__ import annotations

import pytest

from dslo_edge.config import load_config
from dslo_edge.errors import ConfigError

DEVICE = '[device]\nid = "two-head"\nbundle = "bundle"\n'


def _load(tmp_path, text: str):
    (tmp_path / "bundle").mkdir(exist_ok=True)
    (tmp_path / "device.toml").write_text(DEVICE + text)
    return load_config(tmp_path / "device.toml")


def test_task_inherits_device_settings(tmp_path) -> None:
    config = _load(
        tmp_path,
        "[training]\ntemperature = 3.0\n[alpha]\nstart = 0.7\n"
        "[smoothing]\nlambda = 0.5\n[training.tasks.digit]\nweight = 2.0\n",
    )

    digit = config.training.tasks["digit"]
    assert digit.weight == 2.0
    assert digit.temperature == 3.0
    assert digit.alpha.alpha_start == 0.7
    assert digit.smoothing_lambda == 0.5
    assert config.training.head_task("shape").weight == 1.0


def test_task_drift_min_rows_overrides_monitor(tmp_path) -> None:
    config = _load(
        tmp_path,
        "[monitor]\ndrift_min_rows = 4\n"
        "[training.tasks.digit]\ndrift_min_rows = 16\n"
        "[training.tasks.shape]\nweight = 0.5\n",
    )

    assert config.training.tasks["digit"].drift.min_rows == 16
    assert config.training.tasks["shape"].drift.min_rows == 4
    assert config.training.head_task("parity").drift.min_rows == 4


def test_task_table_errors_name_key(tmp_path) -> None:
    cases = {
        "[training.tasks.digit]\ndrift_min_rows = 0\n": (
            "training.tasks.digit.drift_min_rows = 0 is invalid; expected a "
            "count of rows in 1..1000000"
        ),
        "[training.tasks.digit]\nspeed = 1\n": "unknown key training.tasks.digit.speed",
        "[training.tasks.digit]\nweight = -1.0\n": "training.tasks.digit.weight = -1.0",
        '[training.tasks]\n"a-b" = {}\n': (
            "[training.tasks.a-b] has an invalid head name 'a-b', expected ASCII "
            "letters, digits and '_' only. The converter names the head of output "
            "layer 'a-b' 'a_b', so write [training.tasks.a_b]"
        ),
        '[training.tasks."größe"]\nweight = 1\n': (
            "head name 'größe', expected ASCII letters, digits and '_' only. The "
            "converter names the head of output layer 'größe' 'gr__e', so write "
            "[training.tasks.gr__e]"
        ),
        '[training.tasks.""]\nweight = 1\n': (
            "[training.tasks.] has an invalid head name '', expected ASCII "
            "letters, digits and '_' only"
        ),
        "[training.tasks.digit.alpha]\nw_conf = 0.5\n": (
            "[training.tasks.digit.alpha] invalid weights w_conf=0.5"
        ),
        "[training.tasks]\ndigit = 3\n": "training.tasks.digit = 3 is invalid",
    }
    for text, fragment in cases.items():
        with pytest.raises(ConfigError) as raised:
            _load(tmp_path, text)
        assert fragment in str(raised.value), text
