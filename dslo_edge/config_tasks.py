"""Per-head settings of a multi-head student: ``[training.tasks.<head>]`` tables.

Each table sets the fields of ``dynamic.TaskSettings``: ``weight``,
``temperature``, ``smoothing_lambda``, ``smoothing_capacity``,
``hard_label_fallback``, ``monitor_decay``, the drift boost as
``drift_threshold``, ``drift_lambda``, ``drift_updates`` and ``drift_min_rows``
(the names of the ``[monitor]`` table), and an ``alpha`` sub-table with the keys of the
device-wide ``[alpha]`` table. A key that a table leaves out takes the
device-wide value, except ``weight``, which defaults to 1. Head names are
checked against the bundle when the trainer is built, because the config does
not know them.
"""

from __future__ import annotations

import re

from dslo_edge.config_reader import TableReader
from dslo_edge.dynamic import HARD_LABEL_FALLBACKS, DriftBoost, TaskSettings
from dslo_edge.errors import ConfigError
from dslo_edge.softlabels import SCHEDULE_KINDS, AlphaPolicy, Schedule

# Head names as the converter writes them (converters.heads.head_name).
HEAD_NAME = re.compile(r"\w+", re.ASCII)
_UNIT = (lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
# The smoothing store and the teacher monitor each allocate one row per sample
# id, so a mistyped capacity such as 1e17 would fail to allocate once they fill.
# The maximum is that of training.applied_id_capacity.
# NOTE: the daemon does not check the capacity against the board's RAM.
SMOOTHING_CAPACITY = (
    lambda v: 1 <= v <= 10_000_000,
    "a count of sample ids in 1..10000000",
)


def read_tasks(reader: TableReader, base: TaskSettings) -> dict[str, TaskSettings]:
    """Read every ``[training.tasks.<head>]`` table, in file order.

    Raises:
        ConfigError: a head name is not a word of ASCII letters, digits and
            '_', a table has an invalid or unknown key, or a value is out of
            range.
    """
    tasks = {}
    for name in list(reader.table):
        if not HEAD_NAME.fullmatch(name):
            raise _invalid_head_name(reader, name)
        tasks[name] = _task(reader.section(name), base)
    return tasks


def _invalid_head_name(reader: TableReader, name: str) -> ConfigError:
    message = (
        f"{reader.source}: [{reader.path}{name}] has an invalid head name "
        f"{name!r}, expected ASCII letters, digits and '_' only"
    )
    converted = re.sub(r"\W", "_", name, flags=re.ASCII)
    if converted:
        message += (
            ". The converter names the head of output layer "
            f"{name!r} {converted!r}, so write [{reader.path}{converted}]"
        )
    return ConfigError(message)


def _task(reader: TableReader, base: TaskSettings) -> TaskSettings:
    settings = TaskSettings(
        alpha=read_alpha(reader.section("alpha"), base.alpha),
        temperature=reader.get(
            "temperature",
            float,
            base.temperature,
            lambda v: 0 < v <= 100,
            "a number in (0, 100]",
        ),
        smoothing_lambda=reader.get(
            "smoothing_lambda",
            float,
            base.smoothing_lambda,
            lambda v: 0 <= v <= 100,
            "a number in [0, 100]",
        ),
        smoothing_capacity=reader.get(
            "smoothing_capacity",
            int,
            base.smoothing_capacity,
            *SMOOTHING_CAPACITY,
        ),
        hard_label_fallback=reader.get(
            "hard_label_fallback",
            str,
            base.hard_label_fallback,
            lambda v: v in HARD_LABEL_FALLBACKS,
            "'argmax' or 'mask'",
        ),
        monitor_decay=reader.get(
            "monitor_decay",
            float,
            base.monitor_decay,
            lambda v: 0 <= v < 1,
            "a number in [0, 1)",
        ),
        drift=read_drift_boost(reader, base.drift),
        weight=reader.get(
            "weight", float, 1.0, lambda v: 0 <= v <= 1000, "a number in [0, 1000]"
        ),
    )
    reader.reject_unknown()
    return settings


def read_drift_boost(reader: TableReader, base: DriftBoost) -> DriftBoost:
    """Read the drift boost keys of a table; absent keys take ``base``'s values."""
    return DriftBoost(
        threshold=reader.get(
            "drift_threshold",
            float,
            base.threshold,
            lambda v: 0 < v <= 100,
            "a KL divergence in nats in (0, 100]",
        ),
        smoothing_lambda=reader.get(
            "drift_lambda",
            float,
            base.smoothing_lambda,
            lambda v: 0 <= v <= 100,
            "a number in [0, 100]",
        ),
        updates=reader.get(
            "drift_updates",
            int,
            base.updates,
            lambda v: 0 <= v <= 1_000_000,
            "a count of updates in 0..1000000 (0 switches the boost off)",
        ),
        min_rows=reader.get(
            "drift_min_rows",
            int,
            base.min_rows,
            lambda v: 1 <= v <= 1_000_000,
            "a count of rows in 1..1000000",
        ),
    )


def read_alpha(reader: TableReader, base: AlphaPolicy) -> AlphaPolicy:
    """Read an alpha table, such as ``[alpha]``; absent keys take ``base``'s values."""
    try:
        policy = AlphaPolicy(
            alpha_start=reader.get("start", float, base.alpha_start, *_UNIT),
            alpha_end=reader.get("end", float, base.alpha_end, *_UNIT),
            w_conf=reader.get("w_conf", float, base.w_conf, *_UNIT),
            w_time=reader.get("w_time", float, base.w_time, *_UNIT),
            schedule=_schedule(reader, base.schedule),
        )
    except ConfigError as error:
        if str(error).startswith(str(reader.source)):
            raise  # the reader already named the file and key
        raise ConfigError(
            f"{reader.source}: [{reader.path.rstrip('.')}] {error}"
        ) from error
    reader.reject_unknown()
    return policy


def _schedule(reader: TableReader, base: Schedule) -> Schedule:
    return Schedule(
        reader.get(
            "schedule",
            str,
            base.kind,
            lambda v: v in SCHEDULE_KINDS,
            "one of " + ", ".join(SCHEDULE_KINDS),
        ),
        decay=reader.get(
            "decay", float, base.decay, lambda v: 0 < v <= 100, "a number in (0, 100]"
        ),
        steps=reader.get(
            "steps", int, base.steps, lambda v: 1 <= v <= 1000, "an integer in 1..1000"
        ),
    )
