"""Hub configuration: a TOML file, validated before the hub worker starts.

Every error names the file, the key path and the value, and states what is
allowed. Relative paths are resolved against the file's directory. The
``[mqtt]`` table has the keys of the device's, with two shorter defaults.
The session expiry is 300 s, because a dead worker's session keeps
receiving a share of the requests until it expires or another worker ends
it. The longest reconnect delay is 30 s, not 60 s. The protocol must be 5.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dslo_edge.config import MAX_MQTT_PACKET_BYTES, MqttSettings
from dslo_edge.config_reader import REQUIRED as _REQUIRED
from dslo_edge.config_reader import TableReader as _Table
from dslo_edge.config_reader import read_toml
from dslo_edge.config_service import (
    MQTT_HOST_EXPECTED,
    check_login,
    check_tls_client_files,
    is_mqtt_host,
)
from dslo_edge.errors import BundleError, ConfigError
from dslo_edge.label_protocol import HUB_LEVEL
from dslo_edge.privacy import ACCOUNTANTS, PrivacySettings
from dslo_edge.protocol import MAX_TOPIC_LEVEL_BYTES, Topics

if TYPE_CHECKING:
    from dslo_edge.bundle import Bundle
    from dslo_edge.hub import SampleSet

logger = logging.getLogger(__name__)

OUTPUT_KINDS = ("probabilities", "logits")
HUB_SESSION_EXPIRY_S = 300
# The largest mqtt.reconnect_max_s, in seconds, that a hub config accepts.
RECONNECT_MAX_S_LIMIT = 3600.0
# The default hub.watchdog_stall_s, ten times the 30 s that a push may wait for
# one PUBACK, and its allowed range in seconds.
WATCHDOG_STALL_S = 300.0
WATCHDOG_STALL_S_RANGE = (1.0, 86400.0)


@dataclass(frozen=True)
class TeacherSettings:
    """Location of the teacher and how often to look for a new version.

    ``path`` is a bundle directory (its manifest names the teacher file and
    output kind) or a ``.tflite`` file, for which ``output_kind`` is needed.
    """

    path: Path
    output_kind: str | None = None
    reload_poll_s: float = 5.0
    runtime: str = "auto"


@dataclass(frozen=True)
class RequestSettings:
    """Limits and batching of the label requests a worker serves.

    Attributes:
        enabled: whether the worker serves label requests. False for a
            worker that runs only the scheduled pushes, which a teacher with
            several heads needs.
        max_samples: samples per request; larger requests are rejected.
        max_payload_bytes: size limit of a request payload and of its response.
        batch_max_samples: samples per batch, summed over the requests of
            many devices; the teacher labels a batch 256 samples per call.
        batch_wait_s: how long the first request of a batch may wait for
            more to join it.
        top_k: send only the k largest probabilities per sample, 0 for all.
        claim_timeout_s: a request claimed by a worker that has not responded
            within this time may be served by another worker.
        answered_ttl_s: how long answers stay cached for repeated requests.
    """

    enabled: bool = True
    max_samples: int = 256
    max_payload_bytes: int = 4 * 1024 * 1024
    batch_max_samples: int = 1024
    batch_wait_s: float = 0.02
    top_k: int = 0
    claim_timeout_s: float = 30.0
    answered_ttl_s: float = 3600.0


@dataclass(frozen=True)
class RateLimit:
    """A token bucket of label requests per device.

    A device may send ``burst`` requests at once and ``requests_per_s`` on
    average. ``share`` scales both for the workers of one machine when
    several machines serve the same devices without a shared state file,
    for example 0.5 on each of two machines.
    """

    requests_per_s: float = 1.0
    burst: int = 5
    share: float = 1.0

    @property
    def rate(self) -> float:
        """Tokens added per second."""
        return self.requests_per_s * self.share

    @property
    def capacity(self) -> float:
        """Largest number of tokens in the bucket."""
        return max(1.0, self.burst * self.share)


@dataclass(frozen=True)
class PushSchedule:
    """Soft labels for a dataset, pushed to devices every ``every_s`` seconds.

    ``hard_labels`` sends the data file's ``y`` array with the soft labels.
    Those labels get no privacy noise and no budget charge, so a ``[privacy]``
    table rejects it.
    """

    name: str
    devices: tuple[str, ...]
    data: Path
    every_s: float
    batch_size: int = 32
    expiry_s: int = 3600
    hard_labels: bool = False


@dataclass(frozen=True)
class HubConfig:
    """Everything a hub worker needs to start."""

    source: Path
    worker_id: str
    group: str
    state_file: Path
    teacher: TeacherSettings
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    requests: RequestSettings = field(default_factory=RequestSettings)
    rate: RateLimit = field(default_factory=RateLimit)
    privacy: PrivacySettings | None = None
    keys_dir: Path | None = None
    pushes: tuple[PushSchedule, ...] = ()
    metrics_every_s: float = 10.0
    # Seconds that a busy worker thread may go without progress before the
    # watchdog ends the worker (dslo_edge.watchdog).
    watchdog_stall_s: float = WATCHDOG_STALL_S

    @property
    def client_id(self) -> str:
        """The MQTT client id: stable, so a restarted worker resumes its session."""
        return self.mqtt.client_id or f"dslo-hub-{self.worker_id}"

    @property
    def prefix(self) -> str:
        return self.mqtt.topic_prefix


def _positive(value: float) -> bool:
    return value > 0


def _topic_level(value: str) -> bool:
    # Topics.for_device also rejects a --worker-id of bytes that are not UTF-8
    # and a level above MAX_TOPIC_LEVEL_BYTES. The longest hub topic,
    # <prefix>/_hub/workers/<worker>/metrics, has two such levels and 22 more
    # bytes, so it stays within MQTT's 65,535 bytes.
    try:
        Topics.for_device(value)
    except ConfigError:
        return False
    return value != HUB_LEVEL


# Hub topics live under HUB_LEVEL, so _topic_level rejects it too.
TOPIC_LEVEL = (
    f"a name without '/', '+', '#', whitespace or NUL, other than {HUB_LEVEL!r}, "
    f"of at most {MAX_TOPIC_LEVEL_BYTES} bytes of UTF-8"
)


def _mqtt(table: _Table) -> MqttSettings:
    port_range = (lambda v: 0 < v < 65536, "a port in 1..65535")
    settings = MqttSettings(
        host=table.get("host", str, "127.0.0.1", is_mqtt_host, MQTT_HOST_EXPECTED),
        port=table.get("port", int, 1883, *port_range),
        topic_prefix=table.get("topic_prefix", str, "dslo", _topic_level, TOPIC_LEVEL),
        keepalive=table.get(
            "keepalive", int, 30, lambda v: 5 <= v <= 3600, "seconds in 5..3600"
        ),
        client_id=table.get("client_id", str, ""),
        protocol=table.get(
            "protocol", str, "5", lambda v: v == "5", "'5' (label requests need it)"
        ),
        session_expiry_s=table.get(
            "session_expiry_s",
            int,
            HUB_SESSION_EXPIRY_S,
            lambda v: 0 <= v < 2**32,
            "seconds in 0..4294967295",
        ),
        reconnect_min_s=table.get(
            "reconnect_min_s", float, 1.0, lambda v: 0.1 <= v <= 60, "seconds 0.1..60"
        ),
        reconnect_max_s=table.get(
            "reconnect_max_s",
            float,
            30.0,
            lambda v: 1 <= v <= RECONNECT_MAX_S_LIMIT,
            f"seconds 1..{RECONNECT_MAX_S_LIMIT:g}",
        ),
        username=table.get("username", str, ""),
        password_file=table.file("password_file"),
        tls_ca_file=table.file("tls_ca_file"),
        tls_cert_file=table.file("tls_cert_file"),
        tls_key_file=table.file("tls_key_file"),
        tls_insecure=table.get("tls_insecure", bool, False),
    )
    if settings.reconnect_max_s < settings.reconnect_min_s:
        raise table.fail(
            "reconnect_max_s", settings.reconnect_max_s, "at least reconnect_min_s"
        )
    check_tls_client_files(table, settings)
    check_login(table, settings)
    table.reject_unknown()
    return settings


def _teacher(table: _Table) -> TeacherSettings:
    settings = TeacherSettings(
        path=table.path_value("path", _REQUIRED, must_exist=True),
        output_kind=table.get(
            "output_kind",
            str,
            None,
            lambda v: v in OUTPUT_KINDS,
            "'probabilities' or 'logits'",
        ),
        reload_poll_s=table.get(
            "reload_poll_s", float, 5.0, _positive, "finite seconds > 0"
        ),
        runtime=table.get(
            "runtime",
            str,
            "auto",
            lambda v: v in ("auto", "ai-edge-litert", "tflite-runtime"),
            "'auto', 'ai-edge-litert' or 'tflite-runtime'",
        ),
    )
    if settings.path.is_file() and settings.output_kind is None:
        raise ConfigError(
            f"{table.source}: missing key {table.path}output_kind, which "
            f"teacher.path {settings.path.name} needs because it is a model file, "
            "not a bundle whose manifest names the kind; set it to "
            "'probabilities' or 'logits'"
        )
    table.reject_unknown()
    return settings


def _requests(table: _Table) -> RequestSettings:
    count = (lambda v: 1 <= v <= 4096, "an integer in 1..4096")
    settings = RequestSettings(
        enabled=table.get("enabled", bool, True),
        max_samples=table.get("max_samples", int, 256, *count),
        max_payload_bytes=table.get(
            "max_payload_bytes",
            int,
            4 * 1024 * 1024,
            lambda v: 1 <= v <= MAX_MQTT_PACKET_BYTES,
            f"a byte count in 1..{MAX_MQTT_PACKET_BYTES}, the MQTT maximum",
        ),
        batch_max_samples=table.get(
            "batch_max_samples", int, 1024, lambda v: 1 <= v <= 65536, "1..65536"
        ),
        batch_wait_s=table.get(
            "batch_wait_s", float, 0.02, lambda v: 0 <= v <= 5, "seconds in 0..5"
        ),
        top_k=table.get("top_k", int, 0, lambda v: v >= 0, "0 (all) or k >= 1"),
        claim_timeout_s=table.get(
            "claim_timeout_s", float, 30.0, _positive, "finite seconds > 0"
        ),
        answered_ttl_s=table.get(
            "answered_ttl_s", float, 3600.0, _positive, "finite seconds > 0"
        ),
    )
    table.reject_unknown()
    return settings


def _rate(table: _Table) -> RateLimit:
    limit = RateLimit(
        requests_per_s=table.get(
            "requests_per_s", float, 1.0, _positive, "finite requests per second > 0"
        ),
        burst=table.get("burst", int, 5, lambda v: v >= 1, "an integer >= 1"),
        share=table.get("share", float, 1.0, lambda v: 0 < v <= 1, "(0, 1]"),
    )
    table.reject_unknown()
    return limit


def _privacy(table: _Table) -> PrivacySettings | None:
    if not table.table:
        return None
    settings = PrivacySettings(
        noise_multiplier=table.get(
            "noise_multiplier", float, _REQUIRED, _positive, "a finite number > 0"
        ),
        epsilon_budget=table.get(
            "epsilon_budget", float, _REQUIRED, _positive, "a finite number > 0"
        ),
        delta=table.get("delta", float, 1e-5, lambda v: 0 < v < 1, "(0, 1)"),
        accountant=table.get(
            "accountant", str, "rdp", lambda v: v in ACCOUNTANTS, "'rdp' or 'pld'"
        ),
    )
    table.reject_unknown()
    return settings


def _push(table: _Table) -> PushSchedule:
    # every_s and expiry_s look alike, so a missing every_s must not be
    # reported as a misspelt expiry_s.
    table.declare(
        "devices", "name", "data", "every_s", "batch_size", "expiry_s", "hard_labels"
    )
    devices = table.get("devices", list, _REQUIRED, bool, "a non-empty list of ids")
    for device in devices:
        if not isinstance(device, str) or not _topic_level(device):
            raise table.fail("devices", device, f"device ids, each {TOPIC_LEVEL}")
    repeated = sorted({device for device in devices if devices.count(device) > 1})
    if repeated:
        raise table.fail(
            "devices", devices, f"each device id once, but {repeated[0]!r} repeats"
        )
    schedule = PushSchedule(
        name=table.get("name", str, _REQUIRED, bool, "a non-empty name"),
        devices=tuple(devices),
        data=table.path_value("data", _REQUIRED, must_exist=True),
        every_s=table.get("every_s", float, _REQUIRED, _positive, "finite seconds > 0"),
        batch_size=table.get(
            "batch_size", int, 32, lambda v: 1 <= v <= 4096, "1..4096"
        ),
        # MQTT 5 sends the message expiry interval as a 4-byte integer.
        expiry_s=table.get(
            "expiry_s",
            int,
            3600,
            lambda v: 0 < v < 2**32,
            "seconds in 1..4294967295",
        ),
        hard_labels=table.get("hard_labels", bool, False),
    )
    table.reject_unknown()
    return schedule


def load_hub_config(path: str | Path, worker_id: str | None = None) -> HubConfig:
    """Read and validate a hub TOML file.

    Args:
        path: the TOML file.
        worker_id: overrides ``hub.worker_id``, so one file can serve every
            worker of a systemd template unit.

    Raises:
        ConfigError: the file is missing, is not TOML, or has an invalid,
            missing or unknown key.
    """
    source = Path(path)
    root = _Table(source, read_toml(source, "hub config"), "")
    hub = root.section("hub")
    configured_id = hub.get("worker_id", str, "hub-1", _topic_level, TOPIC_LEVEL)
    if worker_id is not None and not _topic_level(worker_id):
        raise ConfigError(f"worker id {worker_id!r} is invalid; expected {TOPIC_LEVEL}")
    group = hub.get("group", str, "dslo-hub", _topic_level, TOPIC_LEVEL)
    state_file = hub.path_value("state_file", "hub-state.sqlite")
    keys_dir = hub.path_value("keys_dir", None, must_exist=True)
    if keys_dir is not None and not keys_dir.is_dir():
        raise hub.fail(
            "keys_dir",
            hub.table["keys_dir"],
            "a directory of <device>.key files (relative to the config), "
            "not a file; set it to the directory that contains the key file",
        )
    metrics_every_s = hub.get(
        "metrics_every_s", float, 10.0, _positive, "finite seconds > 0"
    )
    watchdog_stall_s = _watchdog_stall_s(hub)
    hub.reject_unknown()
    config = HubConfig(
        source=source,
        worker_id=worker_id or configured_id,
        group=group,
        state_file=state_file,
        teacher=_teacher(root.section("teacher")),
        mqtt=_mqtt(root.section("mqtt")),
        requests=_requests(root.section("requests")),
        rate=_rate(root.section("rate_limit")),
        privacy=_privacy(root.section("privacy")),
        keys_dir=keys_dir,
        pushes=tuple(_push(table) for table in root.tables("push")),
        metrics_every_s=metrics_every_s,
        watchdog_stall_s=watchdog_stall_s,
    )
    _check_unique_pushes(source, config.pushes)
    root.reject_unknown()
    for schedule in config.pushes:
        check_private_hard_labels(config, schedule)
    _check_push_data(config)
    return config


def _watchdog_stall_s(hub: _Table) -> float:
    low, high = WATCHDOG_STALL_S_RANGE
    return hub.get(
        "watchdog_stall_s",
        float,
        WATCHDOG_STALL_S,
        lambda v: low <= v <= high,
        f"seconds in {low:g}..{high:g}; set a value in that range, or remove "
        f"the key to use the default {WATCHDOG_STALL_S:g}",
    )


def _check_unique_pushes(source: Path, pushes: tuple[PushSchedule, ...]) -> None:
    names = [push.name for push in pushes]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(
                f"{source}: push name {name!r} is used twice; give each "
                "[[push]] table its own name, because workers claim runs by name"
            )


def _check_push_data(config: HubConfig) -> None:
    """Load each push's data and check it against the teacher, as ``push`` does.

    Raises:
        ConfigError: the teacher is an invalid bundle, or one with several
            heads and a setting that such a teacher cannot serve, or has no
            teacher signature. Also when a push's data cannot be read or
            does not fit the teacher, has no ``y`` for a push with
            ``hard_labels``, or its first batch exceeds the privacy budget.
    """
    # Imported here because these modules load numpy and the interpreter.
    from dslo_edge.bundle import load_bundle

    path = config.teacher.path
    try:
        bundle = load_bundle(path, models=("teacher",)) if path.is_dir() else None
    except BundleError as error:
        # A restart cannot repair the bundle, so the worker exits with status 78.
        raise ConfigError(
            f"{config.source}: cannot load teacher.path {path}: {error}"
        ) from error
    if bundle is not None and bundle.is_multi_head:
        _check_multi_head(config, bundle)
    else:
        _check_output_kind(config, bundle)
    if not config.pushes:
        return
    from dslo_edge.hub import check_samples, load_samples
    from dslo_edge.push_checks import expected_teacher_outputs, read_teacher_signature

    file = bundle.teacher_path if bundle is not None else path
    source = f"{config.source}: teacher.path {file}"
    outputs = ["output"] if bundle is None else list(expected_teacher_outputs(bundle))
    teacher = read_teacher_signature(file, source, outputs, config.teacher.runtime)
    heads = bundle.heads if bundle is not None else {}
    for schedule in config.pushes:
        try:
            samples = load_samples(
                schedule.data, read_labels=schedule.hard_labels, heads=list(heads)
            )
            check_hard_labels_present(schedule, samples)
            # Only a push with hard_labels reads the labels. A multi-head
            # teacher has no single "output", and its heads' labels are
            # checked against the student's heads.
            check_samples(
                samples,
                teacher.input_shape,
                teacher.class_counts.get("output", 0),
                str(schedule.data),
                model="the teacher",
                head_classes=heads,
            )
        except ConfigError as error:
            raise ConfigError(
                f"{config.source}: [[push]] {schedule.name!r}: {error}"
            ) from error
        _check_push_budget(config, schedule, len(samples.x))
        if bundle is None or not bundle.is_multi_head:
            _warn_unsent_labels(config, schedule)


def _check_multi_head(config: HubConfig, bundle: Bundle) -> None:
    """Raise ConfigError for the settings that a multi-head teacher cannot serve.

    Such a worker runs the scheduled pushes with format version 3 updates,
    like ``dslo-edge push --bundle``, and serves no label requests.
    """
    heads = ", ".join(bundle.heads)
    teacher = (
        f"teacher.path {config.teacher.path} is a bundle whose student has "
        f"several heads ({heads})"
    )
    problem = describe_multi_head_output_kind(config.teacher, bundle.heads)
    if problem is not None:
        raise ConfigError(f"{config.source}: {problem}")
    if config.requests.enabled:
        raise ConfigError(
            f"{config.source}: requests.enabled = true (the default) is "
            f"invalid, because {teacher}, and the hub serves label requests "
            "with single-head labels only; set enabled = false in the "
            "[requests] table, so that the worker runs only the [[push]] "
            "schedules"
        )
    check_multi_head_privacy(config, bundle.heads)


def describe_multi_head_output_kind(
    settings: TeacherSettings, heads: Collection[str]
) -> str | None:
    """Describe why teacher.output_kind is invalid for a bundle with ``heads``.

    The manifest of such a bundle names each head's teacher output kind, so
    one configured kind cannot apply. Returns None when the kind is unset.
    The hub checks this at start and for each bundle swapped in later.
    """
    if settings.output_kind is None:
        return None
    return (
        f"teacher.output_kind = {settings.output_kind!r} is invalid, because "
        f"teacher.path {settings.path} is a bundle whose student has several "
        f"heads ({', '.join(heads)}) and its manifest names each head's teacher "
        "output kind; remove teacher.output_kind"
    )


def check_multi_head_privacy(config: HubConfig, heads: Collection[str]) -> None:
    """Raise ConfigError when ``[privacy]`` is set for a student with ``heads``.

    The hub makes private labels for single-head students only, and
    ``dslo-edge push --bundle`` rejects them for such a student too.
    """
    if config.privacy is None:
        return
    raise ConfigError(
        f"{config.source}: the [privacy] table is invalid, because the "
        f"student has several heads ({', '.join(heads)}) and the hub makes "
        "private labels for single-head students only; remove the [privacy] "
        "table"
    )


def check_private_hard_labels(config: HubConfig, schedule: PushSchedule) -> None:
    """Raise ConfigError when a push would send hard labels under ``[privacy]``.

    Hard labels are the data file's ``y`` values, sent without noise and
    without a charge to any device's budget, so they would break the
    ``(epsilon, delta)`` guarantee that ``[privacy]`` gives.
    """
    if not schedule.hard_labels or config.privacy is None:
        return
    raise ConfigError(
        f"{config.source}: [[push]] {schedule.name!r}: hard_labels = true is "
        "invalid with a [privacy] table, because the hub would send the y "
        f"labels of {schedule.data} without noise and without charging the "
        "privacy budget; remove hard_labels from this [[push]] table, so that "
        "devices get only the noised soft labels"
    )


def check_hard_labels_present(schedule: PushSchedule, samples: SampleSet) -> None:
    """Raise ConfigError when ``hard_labels = true`` finds no ``y`` array.

    A file read for a student with several heads has its ``y_<head>``
    arrays, because ``load_samples`` rejects one without them.
    """
    if not schedule.hard_labels or samples.y is not None or samples.head_y:
        return
    raise ConfigError(
        f"hard_labels = true needs a 'y' array (one class index per sample) in "
        f"{schedule.data}, which has none; add y to the file or remove "
        "hard_labels from this [[push]] table"
    )


def _warn_unsent_labels(config: HubConfig, schedule: PushSchedule) -> None:
    """Log a warning when a push without ``[privacy]`` leaves ``y`` unsent.

    Earlier dslo-edge versions sent a data file's ``y`` on every push, so an
    operator may expect it to be sent.
    """
    if schedule.hard_labels or config.privacy is not None:
        return
    from dslo_edge.hub import has_label_array

    if has_label_array(schedule.data):
        logger.warning(
            "Push %s sends no hard labels, but %s has a y array; set "
            "hard_labels = true in its [[push]] table in %s to send y as hard "
            "labels",
            schedule.name,
            schedule.data,
            config.source,
        )


def _check_output_kind(config: HubConfig, bundle: Bundle | None) -> None:
    """Raise ConfigError when teacher.output_kind contradicts the bundle's manifest.

    The hub would send probabilities marked as logits, or the reverse, and
    devices would train on softmax(probabilities) without any error.
    """
    configured = config.teacher.output_kind
    if bundle is None or configured is None:
        return
    if configured != bundle.teacher_output_kind:
        raise ConfigError(
            f"{config.source}: teacher.output_kind = {configured!r} is invalid "
            f"for the bundle {config.teacher.path}, whose manifest says its "
            f"teacher outputs {bundle.teacher_output_kind!r}; remove "
            "teacher.output_kind, which only a .tflite teacher file needs"
        )


def _check_push_budget(
    config: HubConfig, schedule: PushSchedule, sample_count: int
) -> None:
    """Raise ConfigError when a push's first batch alone exceeds the budget.

    The hub charges each batch before it sends it, so such a push would
    never send labels to any device.
    """
    privacy = config.privacy
    if privacy is None:
        return
    try:
        from dslo_edge.privacy import epsilon_spent, format_epsilon_over

        first_batch = min(schedule.batch_size, sample_count)
        epsilon = epsilon_spent(
            {privacy.noise_multiplier: first_batch}, privacy.delta, privacy.accountant
        )
    except ImportError as error:
        raise ConfigError(
            f"{config.source}: [privacy] needs dp-accounting ({error}); install "
            "it with: pip install 'dslo-edge[hub]'"
        ) from error
    if epsilon > privacy.epsilon_budget:
        raise ConfigError(
            f"{config.source}: [[push]] {schedule.name!r}: one batch of "
            f"{first_batch} samples spends epsilon "
            f"{format_epsilon_over(epsilon, privacy.epsilon_budget)}, more than "
            f"privacy.epsilon_budget {privacy.epsilon_budget:g}, so this push "
            "could never send labels; lower its batch_size, or raise "
            "privacy.noise_multiplier or privacy.epsilon_budget"
        )
