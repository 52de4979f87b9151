"""Scheduled pushes: soft labels for a dataset the hub holds, sent to devices.

Each ``[[push]]`` table names a dataset (``.npz`` with ``x`` and optional
``ids`` and ``y``), its devices and a period. Workers that share the state
file claim each run there, so one worker runs it per period. The state
file also keeps the devices that the run has not pushed to yet, so a worker
stopped or killed part way through a run sends the rest when it starts again.
When no worker with that worker id runs, another worker that shares the state
file sends the rest, at its start or at its next check. A device whose push
was under way gets the rest of it: each update is stored with its charge,
so the resumed run publishes the unacknowledged ones again byte for byte,
with their message ids and no new charge, and then the batches never charged.
A run labels the dataset with the current teacher and publishes updates on
each device's ``updates`` topic, signed when the device has a key, with the
privacy noise and budget of the request path. The data file's ``y`` goes
out as hard labels only when the push sets ``hard_labels``, which
``[privacy]`` rejects. A run reads the dataset again when the file changed
since the last run. A device whose budget is spent gets nothing more from
that run.

The scheduler has its own ``TeacherModel``, because the batcher thread uses
the registry's interpreter and LiteRT interpreters are not thread-safe.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from dslo_edge.errors import BrokerError, ConfigError, DsloError
from dslo_edge.hub import (
    FIRST_FAILURE_CODE,
    NO_MATCHING_SUBSCRIBERS,
    NOT_AUTHORIZED,
    SampleSet,
    check_samples,
    describe_non_finite_labels,
    label_probabilities_of,
    load_samples,
    reason_name,
)
from dslo_edge.hub_config import (
    HubConfig,
    PushSchedule,
    check_hard_labels_present,
    check_private_hard_labels,
)
from dslo_edge.hub_state import HubState, StoredBatch
from dslo_edge.hub_teacher import TeacherRegistry, TeacherVersion
from dslo_edge.models import TeacherModel
from dslo_edge.privacy import privatise
from dslo_edge.protocol import SoftLabelUpdate, Topics, encode_update, new_message_id
from dslo_edge.pubacks import PubackTracker
from dslo_edge.push_progress import counted
from dslo_edge.repeat_log import RepeatLimiter, repeats_note
from dslo_edge.signing import key_file_present, load_key, sign

logger = logging.getLogger(__name__)

CHECK_EVERY_S = 1.0
# Budgets are never refilled, so a device stopped once is stopped at each later
# run. A missing key file also fails every run until it is added.
BUDGET_LOG_INTERVAL_S = 3600.0
BUDGET_LOG_MEMORY = 1024
# How long a run waits for the broker to acknowledge one update, counted from
# the acknowledgement before it. It includes a reconnect after the connection
# dropped during the run.
PUBLISH_TIMEOUT_S = 30.0
# How often a running worker looks for runs that a stopped worker id left.
RESUME_CHECK_S = 10.0
# The default of the device's max_age_s (dslo_edge.config): a device with that
# default rejects an update older than this, also one published again.
DEVICE_MAX_AGE_S = 3600.0


@dataclass
class _DevicePush:
    """Updates and samples that one run's push sent to one device."""

    updates: int = 0
    samples: int = 0
    # True when the device's budget ran out before the last batch.
    cut_short: bool = False
    # Samples of the updates that the broker acknowledged to a stopped worker
    # before this run resumed the device's push.
    earlier_samples: int = 0


@dataclass(frozen=True)
class _Labelled:
    """A run's teacher version and outputs, and what they were made from."""

    current: TeacherVersion
    outputs: np.ndarray
    # The teacher file and data file version that StoredBatch.source records.
    source: str


@dataclass(frozen=True)
class _Published:
    """One update published to a device, and its batch index in the push."""

    info: mqtt.MQTTMessageInfo
    samples: int
    batch: int
    # A stored update published again, which the device may have received at
    # the first publish, so its charge is never taken back.
    republished: bool = False


class PushScheduler(threading.Thread):
    """Runs the configured pushes when they are due."""

    def __init__(
        self,
        config: HubConfig,
        state: HubState,
        teacher: TeacherRegistry,
        client: mqtt.Client,
    ):
        super().__init__(name="dslo-hub-pushes", daemon=True)
        self.config = config
        self.state = state
        self.teacher = teacher
        self.client = client
        self._pubacks = PubackTracker(client)
        self.runs = 0
        self.updates = 0
        # Per run and device: got no sample (a spent budget or a failed push),
        # or got some before the budget ran out or the push failed.
        self.skipped_devices = 0
        self.cut_short_devices = 0
        # Stored updates of interrupted pushes published again, and those of
        # them older than DEVICE_MAX_AGE_S, which such a device rejects.
        self.republished_updates = 0
        self.stale_republished_updates = 0
        self._stopping = threading.Event()
        self._model: tuple[str, TeacherModel] | None = None
        # Each data file's samples, with and without y as pushes read them, and
        # the stamp of the file they came from.
        self._samples: dict[
            tuple[Path, bool], tuple[tuple[int, ...] | None, SampleSet]
        ] = {}
        self._rng = np.random.default_rng()
        # The last error of each push's claim, so repeats are not logged.
        self._claim_errors: dict[str, str] = {}
        self._budget_log = RepeatLimiter(BUDGET_LOG_INTERVAL_S, BUDGET_LOG_MEMORY)
        self._failure_log = RepeatLimiter(BUDGET_LOG_INTERVAL_S, BUDGET_LOG_MEMORY)
        # Once every budget is spent, each run sends nothing, so the summary of
        # such runs is logged at most once an hour per push.
        self._empty_run_log = RepeatLimiter(BUDGET_LOG_INTERVAL_S, BUDGET_LOG_MEMORY)
        # The limiter key of each failing push to a device, dropped from the
        # limiter once the push succeeds, so a new failure is logged at once.
        self._failing: dict[tuple[str, str], tuple[str, str, str]] = {}
        self._waiting_for_broker = False
        # Unfinished runs are looked for at the first broker connection, then
        # every RESUME_CHECK_S for those of other worker ids that stopped.
        self._next_resume_check = 0.0

    def counters(self) -> dict[str, int]:
        """Return the push metrics of this worker.

        ``skipped_devices`` counts, per run, the devices that received no
        sample, because their budget was spent or their push failed.
        ``cut_short_devices`` counts those that received part of the dataset
        before their budget ran out or their push failed.
        ``republished_updates`` counts the updates of an interrupted push
        that a resumed run published again unchanged, and
        ``stale_republished_updates`` those of them older than a device's
        default ``max_age_s``, which such a device rejects.
        """
        return {
            "runs": self.runs,
            "updates": self.updates,
            "skipped_devices": self.skipped_devices,
            "cut_short_devices": self.cut_short_devices,
            "republished_updates": self.republished_updates,
            "stale_republished_updates": self.stale_republished_updates,
        }

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        while not self._stopping.wait(CHECK_EVERY_S):
            if not self._connected():
                continue
            if time.monotonic() >= self._next_resume_check:
                self._next_resume_check = time.monotonic() + RESUME_CHECK_S
                self._resume_unfinished()
            for schedule in self.config.pushes:
                if self._stopping.is_set():
                    return
                if self._claim(schedule):
                    self._run(schedule, schedule.devices)

    def _run(self, schedule: PushSchedule, devices: tuple[str, ...]) -> None:
        """Run a push for ``devices``, logging a failure of the whole run."""
        try:
            self.run_once(schedule, devices)
            return
        except (DsloError, OSError, RuntimeError, sqlite3.Error) as error:
            logger.error(
                "Push %s failed: %s; the next run is in %.0f s",
                schedule.name,
                error,
                schedule.every_s,
            )
        except Exception:
            # Without this, one bug would end every later push while
            # the worker keeps serving requests as if all were well.
            logger.exception(
                "Push %s failed unexpectedly; the next run is in %.0f s",
                schedule.name,
                schedule.every_s,
            )
        self._end_run(schedule)

    def _end_run(self, schedule: PushSchedule) -> None:
        """Record a failed or emptied run as ended, so a restart does not send it."""
        try:
            self.state.end_run(schedule.name)
        except sqlite3.Error as error:
            logger.error(
                "Push %s cannot record the end of its failed run in "
                "hub.state_file %s: %s; a restart of this worker before the "
                "next run sends the run to the devices it had not reached",
                schedule.name,
                self.state.path,
                error,
            )

    def _resume_unfinished(self) -> None:
        """Send the runs that stopped workers claimed and did not finish.

        The runs are this worker id's, which no other live worker runs because
        this worker has the id's lock, or those of other ids with no worker.
        """
        for schedule in self.config.pushes:
            if self._stopping.is_set():
                return
            try:
                unfinished = self.state.take_unfinished_run(schedule.name, time.time())
            except sqlite3.Error as error:
                logger.error(
                    "Push %s cannot read its unfinished run from hub.state_file "
                    "%s: %s; the devices it had not reached get the next run",
                    schedule.name,
                    self.state.path,
                    error,
                )
                continue
            if unfinished is None:
                continue
            for worker in unfinished.taken_from:
                logger.info(
                    "Push %s takes over the unfinished run of worker %s, which is "
                    "not running",
                    schedule.name,
                    worker,
                )
            for device in unfinished.interrupted:
                logger.warning(
                    "Push %s to device %s was under way when worker %s stopped, "
                    "which ran a dslo-edge version that stores no batches; the "
                    "device gets no more of that run, because it may have "
                    "received and been charged for part of it",
                    schedule.name,
                    device,
                    ", ".join(unfinished.taken_from) or self.state.worker_id,
                )
            # A device removed from push.devices since the run was claimed
            # gets nothing more.
            remaining = {*unfinished.pending, *unfinished.partly_sent}
            devices = tuple(d for d in schedule.devices if d in remaining)
            if not devices:
                self._end_run(schedule)
                continue
            logger.info(
                "Push %s resumes the run that was cut off: %d of %s remain (%s)",
                schedule.name,
                len(devices),
                counted(len(schedule.devices), "device"),
                ", ".join(devices),
            )
            self._run(schedule, devices)

    def _connected(self) -> bool:
        """Return whether the broker connection is up, logging once per outage.

        Runs are not claimed while it is down, because a claimed run counts as
        done for its period, even when paho could not publish its updates.
        """
        connected = self.client.is_connected()
        if not connected and not self._waiting_for_broker:
            logger.warning(
                "Scheduled pushes wait for the broker connection; runs that "
                "fall due meanwhile start when the worker reconnects"
            )
        elif connected and self._waiting_for_broker:
            logger.info("Scheduled pushes resume: the broker connection is back")
        self._waiting_for_broker = not connected
        return connected

    def _claim(self, schedule: PushSchedule) -> bool:
        """Claim a due run in the state file, logging a failure once per error."""
        try:
            claimed = self.state.claim_run(
                schedule.name, time.time(), schedule.every_s, schedule.devices
            )
        except sqlite3.Error as error:
            # A locked or damaged state file must not end the scheduler thread.
            if str(error) != self._claim_errors.get(schedule.name):
                logger.error(
                    "Push %s cannot be claimed in hub.state_file %s: %s; trying "
                    "again every %g s",
                    schedule.name,
                    self.state.path,
                    error,
                    CHECK_EVERY_S,
                )
            self._claim_errors[schedule.name] = str(error)
            return False
        self._claim_errors.pop(schedule.name, None)
        return claimed

    def run_once(
        self, schedule: PushSchedule, devices: tuple[str, ...] | None = None
    ) -> None:
        """Label the schedule's dataset and publish it to each of ``devices``.

        Each device leaves the run's record in the state file once its push
        ends, and the run's record goes when the run ends without a stop.

        Args:
            devices: the devices to push to, by default all of the schedule's.

        Raises:
            ConfigError: the teacher gave NaN or infinite labels; nothing was
                sent.
        """
        # One version for the whole run, even when the teacher is reloaded.
        current = self.teacher.current
        model = self._teacher_model(current)
        samples = self._load(schedule, model)
        outputs = model.predict(samples.x)
        problem = describe_non_finite_labels(outputs, samples.x, samples.ids)
        if problem is not None:
            # Read the file again at the next run, in case it was fixed.
            self._samples.pop((schedule.data, schedule.hard_labels), None)
            raise ConfigError(
                f"{problem}. Check or rescale the inputs in {schedule.data}; "
                "nothing was sent"
            )
        if devices is None:
            devices = schedule.devices
        labelled = _Labelled(current, outputs, self._source(schedule, current))
        sent_samples = 0
        reached = 0
        stopped = False
        for device in devices:
            if self._stopping.is_set():
                # The state file keeps the other devices, which get the
                # dataset when this worker id starts again, or from another
                # worker if it does not.
                stopped = True
                break
            sent = _DevicePush()
            failed = False
            try:
                self._push_device(schedule, device, samples, labelled, sent)
            except (DsloError, OSError) as error:
                # One device's unreadable key or lost publishes must not stop
                # the other devices.
                self._log_failed(schedule, device, error)
                failed = True
            else:
                failure = self._failing.pop((schedule.name, device), None)
                if failure is not None:
                    self._failure_log.forget(failure)
            # A failed push still counts the updates the broker acknowledged.
            self.updates += sent.updates
            sent_samples += sent.samples
            reached += sent.samples + sent.earlier_samples > 0
            if sent.samples + sent.earlier_samples == 0:
                self.skipped_devices += 1
            elif failed or sent.cut_short:
                self.cut_short_devices += 1
            if failed and self._stopping.is_set():
                # The device's charged batches stay stored, so the run that
                # resumes publishes those not acknowledged and the rest.
                stopped = True
                break
            self.state.end_device_push(schedule.name, device)
        if not stopped:
            self.state.end_run(schedule.name)
        self.runs += 1
        self._log_run(
            schedule, current, len(samples.x), sent_samples, (reached, len(devices))
        )

    def _log_run(
        self,
        schedule: PushSchedule,
        current: TeacherVersion,
        dataset_size: int,
        sent_samples: int,
        reached: tuple[int, int],
    ) -> None:
        """Log a run's summary, and a run that sent nothing at most once an hour.

        Args:
            reached: the devices that received samples, and the run's devices.
        """
        if sent_samples:
            self._empty_run_log.forget(schedule.name)
            repeats = ""
        else:
            skipped = self._empty_run_log.skipped_before(schedule.name)
            if skipped is None:
                return
            repeats = repeats_note(skipped, "run sent nothing", "runs sent nothing")
        # A spent privacy budget stops a device's push early, so the counts
        # can fall short of the dataset and the device list.
        logger.info(
            "Push %s sent %s in all (dataset %d) of teacher %s (round %d) to "
            "%d of %s%s",
            schedule.name,
            counted(sent_samples, "sample"),
            dataset_size,
            current.version,
            current.round,
            reached[0],
            counted(reached[1], "device"),
            repeats,
        )

    def _load(self, schedule: PushSchedule, model: TeacherModel) -> SampleSet:
        """Return the push's samples, read again when the file changed.

        A changed file that cannot be read or does not fit the teacher, such
        as a copy still in progress, is logged, and the samples read before
        are sent.

        Raises:
            ConfigError: the file is invalid and no earlier samples exist, or
                the push sets ``hard_labels`` and the configuration has
                ``[privacy]``.
        """
        # The loaded configuration rejects this, but a HubConfig built in code
        # is not checked, and hard labels must never bypass the privacy noise.
        check_private_hard_labels(self.config, schedule)
        path = schedule.data
        stamp = _file_stamp(path)
        cached = self._samples.get((path, schedule.hard_labels))
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            samples = load_samples(path, read_labels=schedule.hard_labels)
            check_hard_labels_present(schedule, samples.y is not None)
            check_samples(
                samples,
                model.input_shape,
                model.class_count,
                str(path),
                model="the teacher",
            )
        except ConfigError as error:
            if cached is None:
                raise
            logger.error(
                "Push %s cannot use the changed data file: %s; sending the %s "
                "read from it before, and reading it again at the next run",
                schedule.name,
                error,
                counted(len(cached[1].x), "sample"),
            )
            return cached[1]
        self._samples[(path, schedule.hard_labels)] = (stamp, samples)
        return samples

    def _source(self, schedule: PushSchedule, current: TeacherVersion) -> str:
        """Return what the run's batches are made from, for ``StoredBatch.source``.

        It names the teacher file and the version of the data file that
        ``_load`` returned, so a resumed run can tell whether its batches match.
        """
        stamp = self._samples[(schedule.data, schedule.hard_labels)][0]
        return json.dumps(
            {
                "teacher": current.identity,
                "data": str(schedule.data),
                "data_stamp": stamp,
                "hard_labels": schedule.hard_labels,
            }
        )

    def _teacher_model(self, current: TeacherVersion) -> TeacherModel:
        if self._model is None or self._model[0] != current.identity:
            model = current.new_model(self.config.teacher.runtime)
            self._model = (current.identity, model)
        return self._model[1]

    def _push_device(
        self,
        schedule: PushSchedule,
        device: str,
        samples: SampleSet,
        labelled: _Labelled,
        sent: _DevicePush,
    ) -> None:
        """Publish one device's batches and record in ``sent`` what was sent.

        Args:
            sent: receives the updates and samples that the broker
                acknowledged and did not drop. When this raises, it has those
                acknowledged before.

        Raises:
            BrokerError: the broker did not acknowledge an update in time, or
                dropped one because no client subscribes to the device's topic.
        """
        published: list[_Published] = []
        # Only PUBACKs numbered after this one can acknowledge this device's updates.
        since = self._pubacks.sequence
        try:
            self._publish_batches(schedule, device, samples, labelled, published, sent)
        except Exception:
            dropped = self._record_delivered(schedule, device, published, since, sent)
            if dropped:
                logger.error("Push %s to device %s: %s", schedule.name, device, dropped)
            raise
        problems = [
            self._wait_for_acknowledgements(schedule, device, published, since),
            self._record_delivered(schedule, device, published, since, sent),
        ]
        if any(problems):
            raise BrokerError(
                ". Also, ".join(problem for problem in problems if problem)
            )

    def _publish_batches(
        self,
        schedule: PushSchedule,
        device: str,
        samples: SampleSet,
        labelled: _Labelled,
        published: list[_Published],
        sent: _DevicePush,
    ) -> None:
        """Publish each batch, appending it to ``published``.

        A device whose push a stopped worker left gets again the stored
        batches that the broker did not acknowledge, then the batches never
        charged. Sets ``sent.cut_short`` when the device's budget ran out
        before the last batch, or when the stored batches came from another
        teacher or data file.
        """
        topic = Topics.for_device(device, self.config.prefix).updates
        key = self._key(device)
        self.state.start_device_push(schedule.name, device)
        stored = self.state.stored_push_batches(schedule.name, device)
        first = 0
        if stored:
            sent.earlier_samples = sum(
                batch.end_sample - batch.first_sample
                for batch in stored
                if batch.acknowledged
            )
            self._republish(schedule, device, topic, stored, published)
            if stored[-1].source != labelled.source:
                self._log_changed_source(schedule, device, stored[-1])
                sent.cut_short = True
                return
            first = stored[-1].end_sample
        starts = range(first, len(samples.x), schedule.batch_size)
        for index, start in enumerate(starts, start=len(stored)):
            stop = min(start + schedule.batch_size, len(samples.x))
            batch = self._new_batch(schedule, samples, labelled, (start, stop), index)
            payload = batch.payload if key is None else sign(key, topic, batch.payload)
            batch = replace(batch, payload=payload)
            # The charge and the stored payload are on disk before the publish,
            # so a resumed run sends these same bytes and charges nothing more.
            refusal = self.state.store_push_batch(
                schedule.name, device, batch, self.config.privacy
            )
            if refusal:
                self._log_spent(device, refusal)
                sent.cut_short = True
                return
            info = self._publish(topic, payload, schedule.expiry_s)
            published.append(_Published(info, stop - start, index))

    def _new_batch(
        self,
        schedule: PushSchedule,
        samples: SampleSet,
        labelled: _Labelled,
        rows: tuple[int, int],
        index: int,
    ) -> StoredBatch:
        """Label the dataset rows ``rows`` (end excluded) into an unsigned update."""
        start, stop = rows
        labels, kind = self._labels(labelled.outputs[start:stop], labelled.current)
        now = time.time()
        update = SoftLabelUpdate(
            message_id=new_message_id(),
            teacher_version=labelled.current.version,
            teacher_round=labelled.current.round,
            timestamp=now,
            sample_ids=samples.ids[start:stop],
            inputs=samples.x[start:stop],
            labels=labels,
            label_kind=kind,
            hard_labels=_batch_hard_labels(schedule, samples, start, stop),
        )
        return StoredBatch(
            batch=index,
            first_sample=start,
            end_sample=stop,
            source=labelled.source,
            created=now,
            payload=encode_update(update),
        )

    def _publish(
        self, topic: str, payload: bytes, expiry_s: float
    ) -> mqtt.MQTTMessageInfo:
        properties = Properties(PacketTypes.PUBLISH)
        properties.MessageExpiryInterval = max(1, int(expiry_s))
        return self.client.publish(topic, payload, qos=1, properties=properties)

    def _republish(
        self,
        schedule: PushSchedule,
        device: str,
        topic: str,
        stored: list[StoredBatch],
        published: list[_Published],
    ) -> None:
        """Publish again, unchanged, the stored batches the broker did not acknowledge.

        They keep their message ids, so a device that got one before skips it,
        and their charge, so nothing is charged again.
        """
        # NOTE: a device whose key was replaced since rejects the updates
        # signed with its old key.
        waiting = [batch for batch in stored if not batch.acknowledged]
        now = time.time()
        stale = 0
        for batch in waiting:
            age = now - batch.created
            stale += age > DEVICE_MAX_AGE_S
            # The update keeps what remains of the push's expiry_s, counted
            # from the first publish, and at least 1 s.
            info = self._publish(topic, batch.payload, schedule.expiry_s - age)
            samples = batch.end_sample - batch.first_sample
            published.append(_Published(info, samples, batch.batch, republished=True))
        self.republished_updates += len(waiting)
        self.stale_republished_updates += stale
        logger.info(
            "Push %s resumes device %s after batch %d: skips %d acknowledged "
            "before the stop and publishes %d again unchanged",
            schedule.name,
            device,
            stored[-1].batch,
            len(stored) - len(waiting),
            len(waiting),
        )
        if stale:
            logger.warning(
                "Push %s to device %s published again %d of its updates that are "
                "older than %.0f s, which a device with the default max_age_s "
                "rejects",
                schedule.name,
                device,
                stale,
                DEVICE_MAX_AGE_S,
            )

    def _log_changed_source(
        self, schedule: PushSchedule, device: str, last: StoredBatch
    ) -> None:
        logger.warning(
            "Push %s to device %s stops after batch %d (sample %d of the dataset): "
            "the teacher file or the data file changed since the interrupted run "
            "made its first batches, so the rest would not match them; the device "
            "gets the whole dataset at the next run",
            schedule.name,
            device,
            last.batch,
            last.end_sample,
        )

    def _wait_for_acknowledgements(
        self,
        schedule: PushSchedule,
        device: str,
        published: list[_Published],
        since: int,
    ) -> str:
        """Wait for the broker to acknowledge each update; return "" or what failed.

        Each acknowledged batch is marked so in the state file at once, so a
        resumed run does not publish it again.
        """
        for entry in published:
            problem = self._pubacks.wait_for_all(
                [entry.info], since, PUBLISH_TIMEOUT_S, self._stopping
            )
            if problem:
                break
            self._mark_acknowledged(schedule, device, entry.batch)
        else:
            return ""
        waiting = sum(
            self._pubacks.reason_code(entry.info.mid, since) is None
            for entry in published
        )
        return (
            f"{waiting} of {len(published)} updates were not acknowledged by the "
            f"broker ({problem}); paho sends the queued ones if the worker "
            "reconnects before it stops"
        )

    def _mark_acknowledged(
        self, schedule: PushSchedule, device: str, batch: int
    ) -> None:
        try:
            self.state.acknowledge_push_batch(schedule.name, device, batch)
        except sqlite3.Error as error:
            # Only a resumed run reads the mark. Without it, that run publishes
            # the batch again with its message id, which the device skips.
            logger.warning(
                "Push %s cannot mark batch %d of device %s as acknowledged in "
                "hub.state_file %s: %s",
                schedule.name,
                batch,
                device,
                self.state.path,
                error,
            )

    def _record_delivered(
        self,
        schedule: PushSchedule,
        device: str,
        published: list[_Published],
        since: int,
        sent: _DevicePush,
    ) -> str:
        """Record in ``sent`` the updates acknowledged and kept by the broker.

        Returns:
            "", or a description of the updates that the broker dropped or
            rejected, whose privacy charge this takes back.
        """
        delivered = []
        # The sample counts of the dropped or rejected updates, per reason code.
        undelivered: dict[int, list[int]] = {}
        # The undelivered updates whose charge goes back.
        refunded: list[_Published] = []
        for entry in published:
            reason_code = self._pubacks.reason_code(entry.info.mid, since)
            if reason_code is None:
                continue
            if (
                reason_code == NO_MATCHING_SUBSCRIBERS
                or reason_code >= FIRST_FAILURE_CODE
            ):
                undelivered.setdefault(reason_code, []).append(entry.samples)
                if not entry.republished:
                    refunded.append(entry)
            else:
                delivered.append(entry.samples)
        sent.updates = len(delivered)
        sent.samples = sum(delivered)
        if not undelivered:
            return ""
        return self._refund_undelivered(
            schedule, device, undelivered, len(published), refunded
        )

    def _refund_undelivered(
        self,
        schedule: PushSchedule,
        device: str,
        undelivered: dict[int, list[int]],
        published: int,
        refunded: list[_Published],
    ) -> str:
        """Take back the privacy charge of undelivered updates and describe them.

        Args:
            undelivered: the sample count of each update that the broker
                dropped or rejected, per PUBACK reason code.
            published: the number of updates published to the device.
            refunded: the updates of ``undelivered`` whose charge to take
                back, which excludes those published again after a stop.
        """
        topic = Topics.for_device(device, self.config.prefix).updates
        problems = [
            _describe_undelivered(reason_code, len(counts), published, topic)
            for reason_code, counts in sorted(undelivered.items())
        ]
        privacy = self.config.privacy
        refunded_samples = sum(entry.samples for entry in refunded)
        if privacy is not None and refunded:
            # A refunded update is marked acknowledged with its refund, so a
            # run that resumes after a stop does not send it again uncharged.
            self.state.refund_push_batches(
                schedule.name,
                device,
                [entry.batch for entry in refunded],
                refunded_samples,
                privacy.noise_multiplier,
            )
            problems.append(
                f"took back the privacy charge of {counted(refunded_samples, 'sample')}"
            )
        samples = sum(sum(counts) for counts in undelivered.values())
        if privacy is not None and refunded_samples < samples:
            problems.append(
                f"kept the charge of {counted(samples - refunded_samples, 'sample')} "
                "published again after a stop, which the device may have "
                "received the first time"
            )
        return "; ".join(problems)

    def _labels(
        self, rows: np.ndarray, current: TeacherVersion
    ) -> tuple[np.ndarray, str]:
        """Return the labels to send and their kind, noised under ``[privacy]``.

        The caller charges them before it publishes them.
        """
        privacy = self.config.privacy
        kind = current.output_kind
        if privacy is None:
            return np.asarray(rows, dtype=np.float32), kind
        if kind == "logits":
            rows = label_probabilities_of(rows)
        return privatise(rows, privacy, self._rng), "probabilities"

    def _log_failed(
        self, schedule: PushSchedule, device: str, error: Exception
    ) -> None:
        """Log a device's failed push, and its repeats once an hour with a count."""
        key = (schedule.name, device, str(error))
        self._failing[(schedule.name, device)] = key
        skipped = self._failure_log.skipped_before(key)
        if skipped is None:
            return
        logger.error(
            "Push %s to device %s failed: %s%s",
            schedule.name,
            device,
            error,
            repeats_note(skipped, "failed run"),
        )

    def _log_spent(self, device: str, refusal: str) -> None:
        """Log a push stopped by the budget, at most once an hour per device."""
        skipped = self._budget_log.skipped_before(device)
        if skipped is None:
            return
        logger.warning(
            "Push to device %s stopped: %s%s. Later stops for this device are "
            "logged at most once an hour",
            device,
            refusal,
            repeats_note(skipped, "stopped run"),
        )

    def _key(self, device: str) -> bytes | None:
        """Return the device's HMAC key, or None when the hub signs nothing.

        Raises:
            ConfigError: keys_dir is set but the device's key file is missing
                or unusable. A device with a key rejects unsigned updates, so
                sending them would only spend its privacy budget.
        """
        if self.config.keys_dir is None:
            return None
        path = self.config.keys_dir / f"{device}.key"
        if not key_file_present(path):
            raise ConfigError(
                f"no HMAC key {device}.key in {self.config.keys_dir}; add the "
                "device's key so the hub can sign its labels"
            )
        return load_key(path)


def _describe_undelivered(
    reason_code: int, count: int, published: int, topic: str
) -> str:
    """Describe ``count`` of ``published`` updates that got ``reason_code``."""
    if published == 1:
        share = "its update"
    elif count == published:
        share = f"all {published} updates"
    else:
        share = f"{count} of {published} updates"
    if reason_code == NO_MATCHING_SUBSCRIBERS:
        return (
            f"the broker dropped {share} unread, because no client subscribes "
            f"to {topic} (the device never connected, its session expired, or "
            "its id in push.devices is mistyped)"
        )
    problem = (
        f"the broker rejected {share} to {topic} with reason code {reason_code} "
        f"({reason_name(reason_code)})"
    )
    if reason_code == NOT_AUTHORIZED:
        problem += (
            ", which mosquitto sends when its ACL does not let the hub's MQTT "
            "user publish there; grant that user write access to the devices' "
            "updates topics"
        )
    return problem


def _batch_hard_labels(
    schedule: PushSchedule, samples: SampleSet, start: int, stop: int
) -> np.ndarray | None:
    """Return the hard labels of one batch, or None unless the push sends them."""
    if not schedule.hard_labels or samples.y is None:
        return None
    return samples.y[start:stop]


def _file_stamp(path: Path) -> tuple[int, ...] | None:
    """Return what changes when a file is rewritten or replaced, or None."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)
