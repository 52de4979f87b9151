"""The publishing of one device's batches in a push run, for ``PushScheduler``.

``BatchPublisher`` labels each batch of the dataset, charges and stores it,
signs it when the device has a key, and publishes it. A teacher with several
heads gives one format version 3 update per batch. For a device whose
push a stopped worker left, it first publishes again, unchanged, the stored
batches that the broker did not acknowledge (signed again if the device's
key changed). While it publishes, it marks the stored batches whose PUBACK
arrived as acknowledged, as ``hub_push_window`` describes. It then waits for
the remaining PUBACKs, for at most ``STOP_PUBACK_WAIT_S`` when the worker is
stopping, and takes back the privacy charge of updates that the broker
dropped or rejected.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, replace

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from dslo_edge.errors import BrokerError, ConfigError
from dslo_edge.hub import (
    NO_MATCHING_SUBSCRIBERS,
    NOT_AUTHORIZED,
    SampleSet,
    hard_labels_to_send,
    label_probabilities_of,
    reason_name,
)
from dslo_edge.hub_config import HubConfig, PushSchedule
from dslo_edge.hub_multihead import multi_head_update
from dslo_edge.hub_push_state import StoredBatch
from dslo_edge.hub_push_window import (
    PUBLISH_WINDOW,
    Published,
    PublishWindow,
    is_delivered,
)
from dslo_edge.hub_state import HubState
from dslo_edge.hub_teacher import TeacherVersion
from dslo_edge.multihead_protocol import MultiHeadUpdate, encode_multi_head_update
from dslo_edge.privacy import privatise
from dslo_edge.protocol import SoftLabelUpdate, Topics, encode_update, new_message_id
from dslo_edge.pubacks import PubackTracker
from dslo_edge.push_progress import counted
from dslo_edge.repeat_log import RepeatLimiter, repeats_note
from dslo_edge.signing import key_file_present, load_key, sign, unverified_body
from dslo_edge.watchdog import Heartbeat

# The logger of hub_pushes, where this code was before, so that log lines and
# logging filters keep its name.
logger = logging.getLogger("dslo_edge.hub_pushes")

# How long a run waits for the broker to acknowledge one update, counted from
# the acknowledgement before it. It includes a reconnect after the connection
# dropped during the run.
PUBLISH_TIMEOUT_S = 30.0
# How long a stopping worker waits in all for the PUBACKs of the updates it
# has published. A broker that works normally sends them well within that
# time, so the resumed run publishes none of them again. A broker that no
# longer sends PUBACKs delays the stop by this much.
STOP_PUBACK_WAIT_S = 1.0


@dataclass
class DevicePush:
    """Updates and samples that one run's push sent to one device."""

    updates: int = 0
    samples: int = 0
    # The part of ``samples`` in stored updates of an interrupted run that
    # were published again, with the teacher round they were labelled by.
    republished_samples: int = 0
    # True when the device's budget ran out before the last batch.
    cut_short: bool = False
    # Samples of the updates that the broker acknowledged to a stopped worker
    # before this run resumed the device's push.
    earlier_samples: int = 0
    # True when the worker began to stop before the device's last batch. The
    # device's push then stays open, so the run that resumes sends the rest.
    stopped: bool = False


@dataclass(frozen=True)
class Labelled:
    """A run's teacher version and outputs, and what they were made from."""

    current: TeacherVersion
    # The teacher's output for the whole dataset, or each head's output for a
    # teacher whose version has head_output_kinds.
    outputs: np.ndarray | dict[str, np.ndarray]
    # The teacher file and data file version that StoredBatch.source records.
    source: str


class BatchPublisher:
    """The device pushes of ``PushScheduler``, which sets these attributes."""

    config: HubConfig
    state: HubState
    client: mqtt.Client
    republished_updates: int
    stale_republished_updates: int
    _pubacks: PubackTracker
    _stopping: threading.Event
    _rng: np.random.Generator
    _budget_log: RepeatLimiter
    # The push thread's progress, beaten at each update published and each
    # PUBACK wait that ends.
    progress: Heartbeat

    def _push_device(
        self,
        schedule: PushSchedule,
        device: str,
        samples: SampleSet,
        labelled: Labelled,
        sent: DevicePush,
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
        # Only PUBACKs numbered after this one can acknowledge this device's updates.
        since = self._pubacks.sequence
        window = PublishWindow(self._pubacks, since, PUBLISH_WINDOW, self.progress)
        published = window.published
        try:
            self._publish_batches(schedule, device, samples, labelled, window, sent)
        except Exception:
            self._mark_acknowledged(schedule, device, window)
            dropped = self._record_delivered(schedule, device, published, since, sent)
            if dropped:
                logger.error("Push %s to device %s: %s", schedule.name, device, dropped)
            raise
        waited = ""
        if sent.stopped:
            # A stopping worker waits only briefly for the missing PUBACKs.
            # The batches still without one stay unmarked, so the run that
            # resumes the push publishes them again.
            window.wait_for_rest(STOP_PUBACK_WAIT_S)
            self._mark_acknowledged(schedule, device, window)
        else:
            waited = self._wait_for_acknowledgements(schedule, device, window)
        problems = [
            waited,
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
        labelled: Labelled,
        window: PublishWindow,
        sent: DevicePush,
    ) -> None:
        """Publish each batch, appending it to ``window.published``.

        A device whose push a stopped worker left gets again the stored
        batches that the broker did not acknowledge, then the batches never
        charged. Each new batch waits for room in ``window``, and its charge
        marks the batches acknowledged since the batch before. Sets
        ``sent.cut_short`` when the device's budget ran out before the last
        batch, or when the stored batches came from another teacher or data
        file. Sets ``sent.stopped`` when the worker began to stop before the
        last batch.

        Raises:
            BrokerError: the broker did not acknowledge an update in time.
            ConfigError: a new batch's update is above
                ``requests.max_payload_bytes``. It is neither charged nor sent.
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
            self._republish(schedule, device, (topic, key), stored, window.published)
            if stored[-1].source != labelled.source:
                self._log_changed_source(schedule, device, stored[-1])
                sent.cut_short = True
                return
            first = stored[-1].end_sample
        starts = range(first, len(samples.x), schedule.batch_size)
        for index, start in enumerate(starts, start=len(stored)):
            if not self._wait_for_room(window):
                sent.stopped = True
                return
            stop = min(start + schedule.batch_size, len(samples.x))
            batch = self._new_batch(schedule, samples, labelled, (start, stop), index)
            payload = batch.payload if key is None else sign(key, topic, batch.payload)
            _check_update_size(schedule, (start, stop), len(payload), self.config)
            batch = replace(batch, payload=payload)
            # The charge and the stored payload are on disk before the publish,
            # so a resumed run sends these same bytes and charges nothing more.
            with window.marking() as acknowledged:
                refusal = self.state.store_push_batch(
                    schedule.name,
                    device,
                    batch,
                    self.config.privacy,
                    acknowledged=acknowledged,
                )
            if refusal:
                self._log_spent(schedule.name, device, refusal)
                sent.cut_short = True
                return
            info = self._publish(topic, payload, schedule.expiry_s)
            window.published.append(Published(info, stop - start, index))
            self.progress.beat()

    def _wait_for_room(self, window: PublishWindow) -> bool:
        """Wait until ``window`` has room for one more update; return False on a stop.

        Raises:
            BrokerError: the broker did not acknowledge the oldest update
                without a PUBACK in time.
        """
        if self._stopping.is_set():
            return False
        problem = window.wait_for_room(PUBLISH_TIMEOUT_S, self._stopping)
        if self._stopping.is_set():
            return False
        if problem:
            raise BrokerError(self._describe_unacknowledged(window, problem))
        return True

    def _new_batch(
        self,
        schedule: PushSchedule,
        samples: SampleSet,
        labelled: Labelled,
        rows: tuple[int, int],
        index: int,
    ) -> StoredBatch:
        """Label the dataset rows ``rows`` (end excluded) into an unsigned update.

        The update is a format version 3 update, with labels per head, when
        the teacher has several heads.
        """
        start, stop = rows
        outputs = labelled.outputs
        if isinstance(outputs, dict):
            heads = _multi_head_update(
                samples, labelled.current, outputs, rows, schedule.hard_labels
            )
            timestamp, payload = heads.timestamp, encode_multi_head_update(heads)
        else:
            labels, kind = self._labels(outputs[start:stop], labelled.current)
            update = SoftLabelUpdate(
                message_id=new_message_id(),
                teacher_version=labelled.current.version,
                teacher_round=labelled.current.round,
                timestamp=time.time(),
                sample_ids=samples.ids[start:stop],
                inputs=samples.x[start:stop],
                labels=labels,
                label_kind=kind,
                hard_labels=_batch_hard_labels(schedule, samples, start, stop),
            )
            timestamp, payload = update.timestamp, encode_update(update)
        return StoredBatch(
            batch=index,
            first_sample=start,
            end_sample=stop,
            source=labelled.source,
            created=timestamp,
            payload=payload,
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
        destination: tuple[str, bytes | None],
        stored: list[StoredBatch],
        published: list[Published],
    ) -> None:
        """Publish again the stored batches the broker did not acknowledge.

        They keep their message ids, so a device that got one before skips it,
        and their charge, so nothing is charged again. Each is signed with the
        device's current key, ``destination``'s second item, so the bytes are
        unchanged unless the key changed since the first publish.
        """
        topic, key = destination
        waiting = [batch for batch in stored if not batch.acknowledged]
        now = time.time()
        stale = 0
        signed_again = 0
        for batch in waiting:
            age = now - batch.created
            # expiry_s stands for the device's max_age_s, which it should be
            # at most: a device rejects an update older than its max_age_s.
            # With a shorter expiry_s this counts some that a device accepts.
            stale += age > schedule.expiry_s
            body = unverified_body(batch.payload)
            payload = body if key is None else sign(key, topic, body)
            signed_again += payload != batch.payload
            # The update keeps what remains of the push's expiry_s, counted
            # from the first publish, and at least 1 s.
            info = self._publish(topic, payload, schedule.expiry_s - age)
            samples = batch.end_sample - batch.first_sample
            published.append(Published(info, samples, batch.batch, republished=True))
            self.progress.beat()
        self.republished_updates += len(waiting)
        self.stale_republished_updates += stale
        logger.info(
            "Push %s resumes device %s after batch %d: skips %d acknowledged "
            "before the stop and publishes %d again %s",
            schedule.name,
            device,
            # Logs count batches from 1, so "after batch 3" means 3 were stored.
            stored[-1].batch + 1,
            len(stored) - len(waiting),
            len(waiting),
            # The next log line explains why the signed bytes differ.
            "with the same bodies and message ids" if signed_again else "unchanged",
        )
        if signed_again and key is None:
            logger.info(
                "Push %s: the hub config sets no keys_dir now, so %d of the "
                "updates published again to device %s go unsigned",
                schedule.name,
                signed_again,
                device,
            )
        elif signed_again:
            logger.info(
                "Push %s: the key of device %s changed since the first publish, "
                "so %d of the updates published again carry its current key",
                schedule.name,
                device,
                signed_again,
            )
        if stale:
            logger.warning(
                "Push %s to device %s published again %d of its updates that are "
                "older than the push's expiry_s of %d s; a device whose max_age_s "
                "is that long rejects them",
                schedule.name,
                device,
                stale,
                schedule.expiry_s,
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
            last.batch + 1,
            last.end_sample,
        )

    def _wait_for_acknowledgements(
        self, schedule: PushSchedule, device: str, window: PublishWindow
    ) -> str:
        """Wait for the broker to acknowledge each update; return "" or what failed.

        The batches acknowledged are marked so in the state file as their
        PUBACKs arrive, so a resumed run does not publish them again.
        """
        problem = ""
        while window.unchecked and not problem:
            problem = window.wait_for_next(PUBLISH_TIMEOUT_S, self._stopping)
            self._mark_acknowledged(schedule, device, window)
        if not problem:
            return ""
        return self._describe_unacknowledged(window, problem)

    def _describe_unacknowledged(self, window: PublishWindow, problem: str) -> str:
        waiting = sum(
            self._pubacks.reason_code(entry.info.mid, window.since) is None
            for entry in window.published
        )
        return (
            f"{waiting} of {len(window.published)} updates were not acknowledged "
            f"by the broker ({problem}); paho sends the queued ones if the worker "
            "reconnects before it stops"
        )

    def _mark_acknowledged(
        self, schedule: PushSchedule, device: str, window: PublishWindow
    ) -> None:
        """Mark the batches of ``window`` acknowledged since the last marks."""
        try:
            with window.marking() as batches:
                if batches:
                    self.state.acknowledge_push_batches(schedule.name, device, batches)
        except sqlite3.Error as error:
            # Only a resumed run reads the marks. Without them, that run
            # publishes the batches again with their message ids, which the
            # device skips.
            logger.warning(
                "Push %s cannot mark %s of device %s as acknowledged in "
                "hub.state_file %s: %s; a resumed run would publish them again, "
                "and the device skips them by message id",
                schedule.name,
                counted(window.unmarked, "batch", "batches"),
                device,
                self.state.path,
                error,
            )

    def _record_delivered(
        self,
        schedule: PushSchedule,
        device: str,
        published: list[Published],
        since: int,
        sent: DevicePush,
    ) -> str:
        """Record in ``sent`` the updates acknowledged and kept by the broker.

        Returns:
            "", or a description of the updates that the broker dropped or
            rejected, whose privacy charge this takes back.
        """
        delivered = []
        republished = 0
        # The sample counts of the dropped or rejected updates, per reason code.
        undelivered: dict[int, list[int]] = {}
        # The undelivered updates whose charge goes back.
        refunded: list[Published] = []
        for entry in published:
            reason_code = self._pubacks.reason_code(entry.info.mid, since)
            if reason_code is None:
                continue
            if not is_delivered(reason_code):
                undelivered.setdefault(reason_code, []).append(entry.samples)
                if not entry.republished:
                    refunded.append(entry)
            else:
                delivered.append(entry.samples)
                republished += entry.samples if entry.republished else 0
        sent.updates = len(delivered)
        sent.samples = sum(delivered)
        sent.republished_samples = republished
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
        refunded: list[Published],
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

    def _log_spent(self, name: str, device: str, refusal: str) -> None:
        """Log push ``name`` stopped by the budget, at most once an hour per device.

        The repeats counted in the line include those of other pushes to the
        same device, because a spent budget stops all of them.
        """
        skipped = self._budget_log.skipped_before(device)
        if skipped is None:
            return
        logger.warning(
            "Push %s to device %s stopped: %s%s. Later stops for this device are "
            "logged at most once an hour",
            name,
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
            f"to {topic} (the device never connected, its session expired, the "
            "broker restarted without persistence, or its id in push.devices "
            "or the hub's mqtt.topic_prefix differs from the device config)"
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


def _multi_head_update(
    samples: SampleSet,
    current: TeacherVersion,
    outputs: dict[str, np.ndarray],
    rows: tuple[int, int],
    hard_labels: bool,
) -> MultiHeadUpdate:
    """Return the multi-head update of the dataset rows ``rows`` (end excluded).

    With ``hard_labels`` it carries each head's rows of ``samples.head_y``.
    Such a push sends no private labels: the loaded configuration rejects
    them for a teacher with several heads.
    """
    start, stop = rows
    kinds = current.head_output_kinds
    # run_once makes outputs per head only for a version with head_output_kinds.
    assert kinds is not None
    hard = None
    if hard_labels and samples.head_y is not None:
        hard = {name: labels[start:stop] for name, labels in samples.head_y.items()}
    return multi_head_update(
        {name: head_rows[start:stop] for name, head_rows in outputs.items()},
        kinds,
        samples.x[start:stop],
        samples.ids[start:stop],
        teacher_version=current.version,
        teacher_round=current.round,
        hard_labels=hard,
    )


def _batch_hard_labels(
    schedule: PushSchedule, samples: SampleSet, start: int, stop: int
) -> np.ndarray | None:
    """Return the hard labels of one batch to send, or None.

    The result is None when the push sends no hard labels or when every label
    of the batch is -1.
    """
    if not schedule.hard_labels or samples.y is None:
        return None
    return hard_labels_to_send(samples.y[start:stop])


def _check_update_size(
    schedule: PushSchedule, rows: tuple[int, int], size: int, config: HubConfig
) -> None:
    """Raise ConfigError for an update above ``requests.max_payload_bytes``.

    Publishing it could cut the worker off the broker, for the reason that
    ``_describe_oversize`` in ``dslo_edge.hub_batch`` gives for a label
    response.
    """
    limit = config.requests.max_payload_bytes
    if size <= limit:
        return
    start, stop = rows
    raise ConfigError(
        f"the update for samples {start} to {stop - 1} is {size} bytes, above "
        f"requests.max_payload_bytes of {limit}, so it was neither charged nor "
        f"sent; lower batch_size of push {schedule.name} below {schedule.batch_size}"
    )
