"""The configuration reference in docs/ is a valid device file."""

from __future__ import annotations

import re
from pathlib import Path

from dslo_edge.config import DeviceConfig, load_config

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_reference_example_loads_with_documented_defaults(tmp_path) -> None:
    text = re.search(r"```toml\n(.*?)```", REFERENCE.read_text(), re.S).group(1)
    (tmp_path / "bundle").mkdir()
    (tmp_path / "device.toml").write_text(text)

    config = load_config(tmp_path / "device.toml")

    assert isinstance(config, DeviceConfig)
    assert config.training.queue_size == 1024
    assert config.training.max_queued_bytes == 8 * 1024 * 1024
    assert config.mqtt.session_expiry_s == 7 * 24 * 3600
    assert config.requests.enabled is False
    assert config.budget.thermal_limit_c is None
    assert config.security.hmac_key_file is None


def test_multi_head_example_loads(tmp_path) -> None:
    blocks = re.findall(r"```toml\n(.*?)```", REFERENCE.read_text(), re.S)
    device = '[device]\nid = "two-head"\nbundle = "bundle"\n'
    (tmp_path / "bundle").mkdir()
    (tmp_path / "device.toml").write_text(device + blocks[1])

    config = load_config(tmp_path / "device.toml")

    shape = config.training.tasks["shape"]
    assert list(config.training.tasks) == ["shape"]
    assert shape.weight == 0.5
    assert shape.temperature == 4.0
    assert shape.alpha.alpha_start == 0.6
    assert shape.alpha.alpha_end == 0.6
    assert shape.alpha.w_conf == 0.7  # from the device-wide [alpha] default
    assert shape.alpha.schedule.kind == "constant"
    assert shape.drift.updates == 20
    assert shape.drift.min_rows == 8
