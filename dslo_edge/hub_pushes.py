"""Scheduled pushes: soft labels for a dataset the hub holds, sent to devices.

Each ``[[push]]`` table names a dataset (``.npz`` with ``x`` and optional
``ids`` and ``y``), its devices and a period. Workers that share the state
file claim each run there, so one worker runs it per period. The state
file also keeps the devices that the run has not pushed to yet, so a worker
stopped or killed part way through a run sends the rest when it starts again.
When no worker with that worker id runs, another worker that shares the state
file sends the rest, at its start or at its next check. A device whose push
was under way gets the rest of it: each update is stored with its charge,
so the resumed run publishes the unacknowledged ones again byte for byte
(signed again if the device's key changed), with their message ids and no
new charge, and then the batches never charged.
A run labels the dataset with the current teacher and publishes updates on
each device's ``updates`` topic, signed when the device has a key, with the
privacy noise and budget of the request path. A teacher for a student with
several heads labels with every head, and the run publishes format version 3
updates. The configuration rejects privacy noise and hard labels for such a
teacher. The data file's ``y`` goes
out as hard labels only when the push sets ``hard_labels``, which
``[privacy]`` rejects. A run reads the dataset again when the file changed
since the last run. A device whose budget is spent gets nothing more from
that run.

The scheduler has its own teacher model, because the batcher thread uses
the registry's interpreter and LiteRT interpreters are not thread-safe.

This module schedules, claims and resumes runs and labels the dataset. The
publishing of each device's batches, the PUBACK waits and the refunds are in
``hub_push_batches``.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

from dslo_edge.errors import ConfigError, DsloError
from dslo_edge.hub import SampleSet, check_samples, load_samples
from dslo_edge.hub_config import (
    HubConfig,
    PushSchedule,
    check_hard_labels_present,
    check_multi_head_privacy,
    check_private_hard_labels,
)
from dslo_edge.hub_multihead import MultiHeadTeacherModel, describe_non_finite_outputs
from dslo_edge.hub_push_batches import BatchPublisher, DevicePush, Labelled
from dslo_edge.hub_state import HubState
from dslo_edge.hub_teacher import (
    AnyTeacherModel,
    TeacherRegistry,
    TeacherVersion,
    predict_in_chunks,
)
from dslo_edge.pubacks import PubackTracker
from dslo_edge.push_progress import counted
from dslo_edge.repeat_log import RepeatLimiter, repeats_note
from dslo_edge.watchdog import Heartbeat

logger = logging.getLogger(__name__)

CHECK_EVERY_S = 1.0
# Budgets are never refilled, so a device stopped once is stopped at each later
# run. A missing key file also fails every run until it is added.
BUDGET_LOG_INTERVAL_S = 3600.0
BUDGET_LOG_MEMORY = 1024
# How often a running worker looks for runs that a stopped worker id left.
RESUME_CHECK_S = 10.0


class PushScheduler(BatchPublisher, threading.Thread):
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
        self.progress = Heartbeat()
        self.runs = 0
        self.updates = 0
        # Per run and device: got no sample (a spent budget or a failed push),
        # or got some before the budget ran out or the push failed.
        self.skipped_devices = 0
        self.cut_short_devices = 0
        # Stored updates of interrupted pushes published again, and those of
        # them older than the push's expiry_s.
        self.republished_updates = 0
        self.stale_republished_updates = 0
        self._stopping = threading.Event()
        self._model: tuple[str, AnyTeacherModel] | None = None
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
        ``stale_republished_updates`` those of them older than the push's
        ``expiry_s``, which a device whose ``max_age_s`` matches it rejects.
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
        self.progress.beat()
        while not self._stopping.wait(CHECK_EVERY_S):
            self.progress.beat()
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
                "Push %s resumes the run that was cut off: %d of %s %s (%s)",
                schedule.name,
                len(devices),
                counted(len(schedule.devices), "device"),
                "remains" if len(devices) == 1 else "remain",
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
        started = time.monotonic()
        # One version for the whole run, even when the teacher is reloaded.
        current = self.teacher.current
        model = self._teacher_model(current)
        samples = self._load(schedule, model)
        outputs = predict_in_chunks(model.predict, samples.x, self.progress)
        problem = describe_non_finite_outputs(outputs, samples.x, samples.ids)
        if problem is not None:
            # Read the file again at the next run, in case it was fixed.
            self._samples.pop((schedule.data, schedule.hard_labels), None)
            raise ConfigError(
                f"{problem}. Check or rescale the inputs in {schedule.data}; "
                "nothing was sent"
            )
        if devices is None:
            devices = schedule.devices
        labelled = Labelled(current, outputs, self._source(schedule, current))
        sent_samples = 0
        republished_samples = 0
        reached = 0
        # Devices that received part of the dataset: a failed push, a spent
        # budget or a stop.
        cut_short = 0
        stopped = False
        for device in devices:
            if self._stopping.is_set():
                # The state file keeps the other devices, which get the
                # dataset when this worker id starts again, or from another
                # worker if it does not.
                stopped = True
                break
            sent = DevicePush()
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
            republished_samples += sent.republished_samples
            reached += sent.samples + sent.earlier_samples > 0
            if sent.samples + sent.earlier_samples == 0:
                self.skipped_devices += 1
            elif failed or sent.cut_short or sent.stopped:
                self.cut_short_devices += 1
                cut_short += 1
            if sent.stopped and not failed:
                self._log_stopped(schedule, device, sent)
            if sent.stopped or (failed and self._stopping.is_set()):
                # The device's charged batches stay stored, so the run that
                # resumes publishes those not acknowledged and the rest.
                stopped = True
                break
            self.state.end_device_push(schedule.name, device)
        if not stopped:
            self.state.end_run(schedule.name)
        self.runs += 1
        self._log_run(
            schedule,
            current,
            len(samples.x),
            (sent_samples - republished_samples, republished_samples),
            (reached, len(devices), cut_short),
        )
        duration = time.monotonic() - started
        if duration > schedule.every_s:
            logger.warning(
                "Push %s took %.1f s, longer than its every_s of %g s; no worker "
                "starts the next run of a push before the run in progress ends",
                schedule.name,
                duration,
                schedule.every_s,
            )

    def _log_run(
        self,
        schedule: PushSchedule,
        current: TeacherVersion,
        dataset_size: int,
        sent: tuple[int, int],
        reached: tuple[int, int, int],
    ) -> None:
        """Log a run's summary, and a run that sent nothing at most once an hour.

        Args:
            sent: the samples that this run labelled, and those in stored
                updates of an interrupted run that it published again.
            reached: the devices that received samples, the run's devices,
                and the devices that received only part of the dataset.
        """
        new_samples, republished_samples = sent
        if new_samples or republished_samples:
            self._empty_run_log.forget(schedule.name)
            repeats = ""
        else:
            skipped = self._empty_run_log.skipped_before(schedule.name)
            if skipped is None:
                return
            repeats = repeats_note(skipped, "run sent nothing", "runs sent nothing")
        # A spent privacy budget stops a device's push early, so the counts
        # can fall short of the dataset and the device list.
        partial = (
            f", {reached[2]} of them only part of the dataset" if reached[2] else ""
        )
        # Those updates keep the labels and teacher round of their first
        # publish, which may be another teacher's.
        republished = (
            f", and {counted(republished_samples, 'sample')} again with the labels "
            "that the interrupted run gave them"
            if republished_samples
            else ""
        )
        logger.info(
            "Push %s sent %s in all (dataset %d) of teacher %s (round %d) to "
            "%d of %s%s%s%s",
            schedule.name,
            counted(new_samples, "sample"),
            dataset_size,
            current.version,
            current.round,
            reached[0],
            counted(reached[1], "device"),
            partial,
            republished,
            repeats,
        )

    def _load(self, schedule: PushSchedule, model: AnyTeacherModel) -> SampleSet:
        """Return the push's samples, read again when the file changed.

        A changed file that cannot be read or does not fit the teacher, such
        as a copy still in progress, is logged, and the samples read before
        are sent.

        Raises:
            ConfigError: the file is invalid and no earlier samples exist, or
                the push sets ``hard_labels`` and the configuration has
                ``[privacy]``, or the teacher has several heads and the
                configuration has ``[privacy]``.
        """
        # The loaded configuration rejects these, but a HubConfig built in code
        # is not checked. Hard labels must never bypass the privacy noise, and
        # multi-head labels are made without it.
        check_private_hard_labels(self.config, schedule)
        head_classes: dict[str, int] = {}
        if isinstance(model, MultiHeadTeacherModel):
            check_multi_head_privacy(self.config, model.output_kinds)
            head_classes = model.class_counts
            class_count = 0
        else:
            class_count = model.class_count
        path = schedule.data
        stamp = _file_stamp(path)
        cached = self._samples.get((path, schedule.hard_labels))
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            samples = load_samples(
                path, read_labels=schedule.hard_labels, heads=list(head_classes)
            )
            check_hard_labels_present(schedule, samples)
            check_samples(
                samples,
                model.input_shape,
                class_count,
                str(path),
                model="the teacher",
                head_classes=head_classes,
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

    def _teacher_model(self, current: TeacherVersion) -> AnyTeacherModel:
        if self._model is None or self._model[0] != current.identity:
            model = current.new_model(self.config.teacher.runtime)
            self._model = (current.identity, model)
        return self._model[1]

    def _log_stopped(
        self, schedule: PushSchedule, device: str, sent: DevicePush
    ) -> None:
        logger.info(
            "Push %s to device %s stops with %s acknowledged by the broker, "
            "because the worker is stopping; the run that resumes it sends the rest",
            schedule.name,
            device,
            counted(sent.samples + sent.earlier_samples, "sample"),
        )

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


def _file_stamp(path: Path) -> tuple[int, ...] | None:
    """Return what changes when a file is rewritten or replaced, or None."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)
