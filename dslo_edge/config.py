"""Device configuration: a TOML file, validated before anything starts.

Every error names the file, the key path and the value, and states what is
allowed. Relative paths are resolved against the file's directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dslo_edge.budget import BudgetSettings
from dslo_edge.config_reader import REQUIRED, TableReader, positive, read_toml
from dslo_edge.config_service import (
    HealthSettings,
    HomeAssistantSettings,
    LoggingSettings,
    MqttSettings,
    RequestsSettings,
    SecuritySettings,
    default_client_id,
    read_budget,
    read_health,
    read_homeassistant,
    read_logging,
    read_mqtt,
    read_requests,
    read_security,
)
from dslo_edge.config_tasks import (
    SMOOTHING_CAPACITY,
    read_alpha,
    read_drift_boost,
    read_tasks,
)
from dslo_edge.dynamic import (
    HARD_LABEL_FALLBACKS,
    PROGRESS_UNITS,
    DriftBoost,
    ProgressSettings,
    TaskSettings,
)
from dslo_edge.label_protocol import HUB_LEVEL
from dslo_edge.protocol import (
    TOPIC_LEVEL_EXPECTED,
    PayloadLimits,
    Topics,
    is_topic_level,
)
from dslo_edge.runtime import RUNTIME_MODULES
from dslo_edge.softlabels import AlphaPolicy

# Updates the daemon may hold unacknowledged, also its MQTT 5 receive maximum.
# A burst saves a checkpoint every 3/8 of it (burst_checkpoint_every in
# daemon.py), so a larger queue means fewer checkpoints in a burst. With the
# digits student, 1024 applied 14 to 25 % more updates per second than 256
# in paired throughput runs (docs/benchmarks.md).
DEFAULT_QUEUE_SIZE = 1024
# Payload bytes that the queue of received updates may hold, so that its
# memory stays bounded whatever size the hub gives each update.
DEFAULT_MAX_QUEUED_BYTES = 8 * 1024 * 1024
DEFAULT_APPLIED_ID_CAPACITY = 100_000


@dataclass(frozen=True)
class TrainingSettings:
    learning_rate: float = 0.05
    temperature: float = 2.0
    planned_updates: int = 1000
    checkpoint_every: int = 20
    metrics_every: int = 5
    queue_size: int = DEFAULT_QUEUE_SIZE
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES
    hard_label_fallback: str = "argmax"
    smoothing_lambda: float = 0.3
    smoothing_capacity: int = 10000
    alpha: AlphaPolicy = field(default_factory=AlphaPolicy)
    # Progress t counts applied updates or teacher rounds (PROGRESS_UNITS).
    progress: str = "updates"
    planned_rounds: int = 10
    monitor_decay: float = 0.9
    drift: DriftBoost = field(default_factory=DriftBoost)
    # Updates whose payload timestamp is older than this are dropped.
    max_age_s: float = 3600.0
    # Payload timestamps this far in the future are rejected as clock skew.
    max_clock_skew_s: float = 300.0
    applied_id_capacity: int = DEFAULT_APPLIED_ID_CAPACITY
    # Idle time after the last update before a checkpoint is written.
    checkpoint_idle_s: float = 2.0
    # Samples per train step when queued updates are coalesced; 0 trains
    # each update as its own step.
    batch_size: int = 0
    batch_wait_ms: float = 5.0
    # Settings of each head of a multi-head student, by head name, from the
    # [training.tasks.<head>] tables. Heads without a table use task().
    tasks: dict[str, TaskSettings] = field(default_factory=dict)

    def task(self) -> TaskSettings:
        """Return the dynamic soft-label settings of the student's one head."""
        return TaskSettings(
            alpha=self.alpha,
            temperature=self.temperature,
            smoothing_lambda=self.smoothing_lambda,
            smoothing_capacity=self.smoothing_capacity,
            hard_label_fallback=self.hard_label_fallback,
            monitor_decay=self.monitor_decay,
            drift=self.drift,
        )

    def head_task(self, name: str) -> TaskSettings:
        """Return the settings of one head of a multi-head student."""
        return self.tasks.get(name) or self.task()

    def progress_settings(self) -> ProgressSettings:
        """Return how training progress t is measured."""
        return ProgressSettings(
            self.progress, self.planned_updates, self.planned_rounds
        )


@dataclass(frozen=True)
class DeviceConfig:
    """Everything the edge daemon needs to start."""

    source: Path
    device_id: str
    bundle: Path
    state_dir: Path
    runtime: str = "auto"
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    limits: PayloadLimits = field(default_factory=PayloadLimits)
    sum_tolerance: float = 1e-3
    security: SecuritySettings = field(default_factory=SecuritySettings)
    health: HealthSettings = field(default_factory=HealthSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    # Firmware profile name (firmware_profiles/<name>.toml); "" for none.
    profile: str = ""
    battery_wh: float | None = None
    budget: BudgetSettings = field(default_factory=BudgetSettings)
    homeassistant: HomeAssistantSettings = field(default_factory=HomeAssistantSettings)
    requests: RequestsSettings = field(default_factory=RequestsSettings)
    # Inputs beyond this magnitude are rejected: finite but huge values from
    # a corrupt update would drive the weights to infinity.
    max_abs_input: float = 1e6

    @property
    def topics(self) -> Topics:
        return Topics.for_device(self.device_id, self.mqtt.topic_prefix)

    @property
    def client_id(self) -> str:
        """The configured client id, else one derived from the machine id."""
        return self.mqtt.client_id or default_client_id(self.device_id, "device")


def _drift(reader: TableReader) -> tuple[float, DriftBoost]:
    """Read the [monitor] table: moving-average decay and the drift boost."""
    decay = reader.get("decay", float, 0.9, lambda v: 0 <= v < 1, "a number in [0, 1)")
    boost = read_drift_boost(reader, DriftBoost())
    reader.reject_unknown()
    return decay, boost


def _training(
    reader: TableReader,
    alpha: AlphaPolicy,
    smoothing: TableReader,
    monitor: TableReader,
) -> TrainingSettings:
    monitor_decay, drift = _drift(monitor)
    applied_id_capacity = reader.get(
        "applied_id_capacity",
        int,
        100_000,
        lambda v: 1000 <= v <= 10_000_000,
        "a count of message ids in 1000..10000000",
    )
    settings = TrainingSettings(
        learning_rate=reader.get(
            "learning_rate", float, 0.05, lambda v: 0 < v <= 10, "a number in (0, 10]"
        ),
        temperature=reader.get(
            "temperature", float, 2.0, lambda v: 0 < v <= 100, "a number in (0, 100]"
        ),
        planned_updates=reader.get(
            "planned_updates", int, 1000, positive, "a positive count of updates"
        ),
        progress=reader.get(
            "progress",
            str,
            "updates",
            lambda v: v in PROGRESS_UNITS,
            " or ".join(repr(unit) for unit in PROGRESS_UNITS),
        ),
        planned_rounds=reader.get(
            "planned_rounds", int, 10, positive, "a positive count of teacher rounds"
        ),
        checkpoint_every=reader.get(
            "checkpoint_every", int, 20, positive, "a positive count of updates"
        ),
        metrics_every=reader.get(
            "metrics_every", int, 5, positive, "a positive count of updates"
        ),
        queue_size=reader.get(
            # At least 2, so that checkpoint_every = 1 fits in half of it. The
            # default stays within half of applied_id_capacity, so a config
            # that lowers only the capacity still loads.
            "queue_size",
            int,
            min(DEFAULT_QUEUE_SIZE, applied_id_capacity // 2),
            lambda v: 2 <= v <= 100000,
            "a count in 2..100000",
        ),
        max_queued_bytes=reader.get(
            "max_queued_bytes",
            int,
            DEFAULT_MAX_QUEUED_BYTES,
            positive,
            "a positive byte count",
        ),
        hard_label_fallback=reader.get(
            "hard_label_fallback",
            str,
            "argmax",
            lambda v: v in HARD_LABEL_FALLBACKS,
            "'argmax' or 'mask'",
        ),
        smoothing_lambda=smoothing.get(
            "lambda", float, 0.3, lambda v: 0 <= v <= 100, "a number in [0, 100]"
        ),
        smoothing_capacity=smoothing.get("capacity", int, 10000, *SMOOTHING_CAPACITY),
        alpha=alpha,
        monitor_decay=monitor_decay,
        drift=drift,
        max_age_s=reader.get(
            "max_age_s", float, 3600.0, positive, "a finite positive number of seconds"
        ),
        max_clock_skew_s=reader.get(
            "max_clock_skew_s",
            float,
            300.0,
            positive,
            "a finite positive number of seconds",
        ),
        applied_id_capacity=applied_id_capacity,
        checkpoint_idle_s=reader.get(
            "checkpoint_idle_s",
            float,
            2.0,
            lambda v: 0 <= v <= 3600,
            "seconds in 0..3600",
        ),
        batch_size=reader.get(
            "batch_size", int, 0, lambda v: 0 <= v <= 4096, "samples in 0..4096"
        ),
        batch_wait_ms=reader.get(
            "batch_wait_ms", float, 5.0, lambda v: 0 <= v <= 1000, "ms in 0..1000"
        ),
    )
    tasks = read_tasks(reader.section("tasks"), settings.task())
    if tasks:
        settings = replace(settings, tasks=tasks)
    if settings.checkpoint_every * 2 > settings.queue_size:
        raise reader.fail(
            "checkpoint_every",
            settings.checkpoint_every,
            f"at most half of queue_size ({settings.queue_size}), because updates "
            "are acknowledged to the broker only after a checkpoint",
        )
    if settings.applied_id_capacity < settings.queue_size * 2:
        # Up to about 3/4 of queue_size applied updates, plus one batch, wait
        # for acknowledgement. A restart receives them again, and the ones
        # whose ids the record already evicted would be applied twice.
        raise reader.fail(
            "applied_id_capacity",
            settings.applied_id_capacity,
            f"at least twice queue_size ({settings.queue_size}), because a "
            "restart receives again the updates applied but not yet "
            "acknowledged, and only ids still in the record are skipped; raise "
            "applied_id_capacity or lower queue_size",
        )
    reader.reject_unknown()
    smoothing.reject_unknown()
    return settings


# MQTT's maximum packet size (MQTT 3.1.1 and 5), so no payload is larger. Every
# sample takes at least one byte, so it also bounds the sample count. Both limits
# go to the compiled decoder as C ssize_t, which a larger int would overflow.
MAX_MQTT_PACKET_BYTES = 268_435_455


def _limits(reader: TableReader) -> tuple[PayloadLimits, float, float]:
    limits = PayloadLimits(
        max_payload_bytes=reader.get(
            "max_payload_bytes",
            int,
            4 * 1024 * 1024,
            lambda v: 1 <= v <= MAX_MQTT_PACKET_BYTES,
            f"a byte count in 1..{MAX_MQTT_PACKET_BYTES}, the MQTT maximum",
        ),
        max_samples=reader.get(
            "max_samples",
            int,
            4096,
            lambda v: 1 <= v <= MAX_MQTT_PACKET_BYTES,
            f"a sample count in 1..{MAX_MQTT_PACKET_BYTES}",
        ),
    )
    tolerance = reader.get(
        "sum_tolerance", float, 1e-3, lambda v: 0 < v < 0.5, "a number in (0, 0.5)"
    )
    max_abs_input = reader.get(
        "max_abs_input", float, 1e6, positive, "a finite positive magnitude"
    )
    reader.reject_unknown()
    return limits, tolerance, max_abs_input


def load_config(path: str | Path) -> DeviceConfig:
    """Read and validate a device TOML file.

    Raises:
        ConfigError: the file is missing, is not TOML, or has an invalid,
            missing or unknown key.
    """
    source = Path(path)
    data = read_toml(source, "config")
    root = TableReader(source, data, "")
    device = root.section("device")
    base = source.parent
    device_id = device.get(
        "id",
        str,
        REQUIRED,
        is_topic_level,
        f"{TOPIC_LEVEL_EXPECTED}, for example 'kitchen-cam'",
    )
    # An empty path would name the config's own folder.
    bundle = base / device.get("bundle", str, REQUIRED, bool, "a non-empty path")
    state_dir = base / device.get("state_dir", str, "state", bool, "a non-empty path")
    runtime = device.get(
        "runtime",
        str,
        "auto",
        lambda v: v == "auto" or v in RUNTIME_MODULES,
        "auto, " + " or ".join(RUNTIME_MODULES),
    )
    profile = device.get("profile", str, "")
    if profile.endswith(".toml"):
        # A profile file is relative to the config file, like every other path,
        # not to the daemon's working directory ("/" under systemd).
        profile = str(base / profile)
    battery_wh = device.get(
        "battery_wh", float, 0.0, lambda v: v >= 0, "finite watt-hours >= 0"
    )
    device.reject_unknown()
    mqtt = read_mqtt(root.section("mqtt"))
    alpha = read_alpha(root.section("alpha"), AlphaPolicy())
    training = _training(
        root.section("training"),
        alpha,
        root.section("smoothing"),
        root.section("monitor"),
    )
    limits, tolerance, max_abs_input = _limits(root.section("limits"))
    security = read_security(root.section("security"))
    health = read_health(root.section("health"))
    log_settings = read_logging(root.section("logging"), state_dir)
    budget = read_budget(root.section("budget"))
    homeassistant = read_homeassistant(root.section("homeassistant"))
    requests = read_requests(root.section("requests"), mqtt)
    root.reject_unknown()
    config = DeviceConfig(
        source,
        device_id,
        bundle,
        state_dir,
        runtime,
        mqtt,
        training,
        limits,
        tolerance,
        security,
        health,
        log_settings,
        profile,
        battery_wh or None,
        budget,
        homeassistant,
        requests,
        max_abs_input,
    )
    if device_id == HUB_LEVEL:
        raise device.fail(
            "id",
            device_id,
            f"a device id other than {HUB_LEVEL!r}, because the hub's own topics "
            "use that level and the hub ignores requests from it",
        )
    return config


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def render_config(
    device_id: str,
    bundle: Path,
    state_dir: Path,
    port: int,
    *,
    planned_updates: int = 1000,
    protocol: str = "5",
    learning_rate: float = 0.05,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> str:
    """Return a device TOML text with the given values and the defaults.

    Args:
        overrides: section -> key -> value, added to or replacing the
            defaults, e.g. ``{"mqtt": {"reconnect_max_s": 2.0}}``.
    """
    sections: dict[str, dict[str, Any]] = {
        "device": {
            "id": device_id,
            "bundle": str(bundle),
            "state_dir": str(state_dir),
            "runtime": "auto",
        },
        "mqtt": {
            "host": "127.0.0.1",
            "port": port,
            "topic_prefix": "dslo",
            "protocol": protocol,
        },
        "training": {
            "learning_rate": learning_rate,
            "temperature": 2.0,
            "planned_updates": planned_updates,
            "progress": "updates",
            "planned_rounds": 10,
            "checkpoint_every": 20,
            "metrics_every": 5,
            "queue_size": DEFAULT_QUEUE_SIZE,
            "max_queued_bytes": DEFAULT_MAX_QUEUED_BYTES,
            "hard_label_fallback": "argmax",
        },
        "alpha": {
            "start": 0.8,
            "end": 0.2,
            "w_conf": 0.7,
            "w_time": 0.3,
            "schedule": "linear",
            "decay": 5.0,
            "steps": 4,
        },
        "smoothing": {"lambda": 0.3, "capacity": 10000},
        "monitor": {
            "decay": 0.9,
            "drift_threshold": 0.5,
            "drift_lambda": 3.0,
            "drift_updates": 20,
            "drift_min_rows": 8,
        },
        "limits": {
            "max_payload_bytes": 4194304,
            "max_samples": 4096,
            "sum_tolerance": 0.001,
        },
    }
    for section, values in (overrides or {}).items():
        sections.setdefault(section, {}).update(values)
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)
