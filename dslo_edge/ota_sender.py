"""Hub side of over-the-air model updates: pack, send, wait for the outcome.

``pack_bundle`` packs only the files of a bundle and checks the archive
against the size a device accepts, before anything is published.
``send_archive`` publishes the chunks (format in ``dslo_edge.ota``).
``StatusWatcher`` subscribes to the device's ``ota/status`` topic before
the first chunk, so the sender learns whether its transfer was installed,
rejected or rolled back. The device publishes each status retained, and
the watcher matches statuses by transfer id, so an older retained status
is never taken for the new transfer's.
"""

from __future__ import annotations

import io
import logging
import tarfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dslo_edge.bundle import MANIFEST_NAME, Bundle, load_bundle, manifest_files
from dslo_edge.errors import BrokerError, BundleError
from dslo_edge.health import PROBE_FILE, check_bundle_probe
from dslo_edge.json_input import parse_json
from dslo_edge.ota import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_ARCHIVE_BYTES,
    MAX_ARCHIVE_MEMBERS,
    RELEASE_FILE,
    OtaError,
    ReleaseOptions,
    ota_topics,
    split_archive,
)
from dslo_edge.protocol import Topics
from dslo_edge.signing import sign

logger = logging.getLogger(__name__)

FINAL_STATES = ("installed", "rejected", "rolled_back")


def bundle_files(bundle: Bundle) -> list[Path]:
    """Return the files a bundle consists of, in the order they are packed.

    These are ``manifest.json``, every file a manifest entry names (student,
    teacher, int8 copy) and ``probe.npz`` when present. Other files in the
    directory are not part of the bundle.

    Raises:
        BundleError: a file the manifest names is missing or not a plain
            file name.
    """
    names = {MANIFEST_NAME}
    for key, name in manifest_files(bundle.manifest).items():
        if "/" in name or name in ("", ".", "..", RELEASE_FILE):
            raise BundleError(
                f"manifest entry {key!r} in {bundle.path} names file {name!r}; "
                "expected a plain file name in the bundle directory"
            )
        names.add(name)
    if (bundle.path / PROBE_FILE).is_file():
        names.add(PROBE_FILE)
    paths = [bundle.path / name for name in sorted(names)]
    for path in paths:
        if not path.is_file():
            raise BundleError(f"bundle file {path} is missing")
    return paths


def pack_bundle(
    bundle_dir: str | Path,
    *,
    options: ReleaseOptions | None = None,
    max_archive_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES,
) -> bytes:
    """Return a tar archive of a verified bundle and its release options.

    Only the files of ``bundle_files`` are packed. Member order, owners and
    times are fixed, so the same bundle and options always pack to the same
    bytes and the same sha256.

    Args:
        bundle_dir: the bundle directory.
        options: release options for the device (defaults: no model change).
        max_archive_bytes: the largest archive the device accepts, 64 MiB
            for ``OtaReceiver``'s default.

    Raises:
        BundleError: the directory is not a valid bundle, its probe.npz does
            not fit the student, or the archive would exceed
            ``max_archive_bytes``.
    """
    bundle = load_bundle(bundle_dir)
    # The device would unpack the release and then reject it as bad_bundle.
    check_bundle_probe(bundle)
    paths = bundle_files(bundle)
    if len(paths) + 1 > MAX_ARCHIVE_MEMBERS:
        raise BundleError(
            f"bundle {bundle.path} has {len(paths)} files; a device accepts at most "
            f"{MAX_ARCHIVE_MEMBERS - 1} plus the release options"
        )
    release = (options or ReleaseOptions()).to_json()
    # The files alone are a lower bound of the archive size, so a bundle far
    # above the limit is rejected before its files are read.
    content = sum(path.stat().st_size for path in paths) + len(release)
    _check_archive_size(bundle.path, content, max_archive_bytes)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for path in paths:
            with open(path, "rb") as stream:
                archive.addfile(_member(path.name, path.stat().st_size), stream)
        archive.addfile(_member(RELEASE_FILE, len(release)), io.BytesIO(release))
    packed = buffer.getvalue()
    _check_archive_size(bundle.path, len(packed), max_archive_bytes)
    return packed


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    return info


def _check_archive_size(bundle_dir: Path, size: int, limit: int) -> None:
    if size > limit:
        raise BundleError(
            f"bundle {bundle_dir} packs to about {size / 2**20:.1f} MiB, above the "
            f"{limit / 2**20:g} MiB a device accepts over the air; shrink the "
            "model or install it with 'dslo-edge flash'"
        )


def send_bundle(
    client: Any,
    topics: Topics,
    bundle_dir: str | Path,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    timeout: float = 30.0,
    hmac_key: bytes | None = None,
    options: ReleaseOptions | None = None,
) -> str:
    """Pack a bundle, publish it in chunks and return the transfer id in hex.

    Raises:
        BundleError: the directory is not a valid bundle or is too large.
        BrokerError: a chunk was not acknowledged within ``timeout`` seconds.
    """
    archive = pack_bundle(bundle_dir, options=options)
    transfer_id = uuid.uuid4().bytes
    send_archive(
        client,
        topics,
        archive,
        transfer_id,
        chunk_bytes=chunk_bytes,
        timeout=timeout,
        hmac_key=hmac_key,
    )
    return transfer_id.hex()


def send_archive(
    client: Any,
    topics: Topics,
    archive: bytes,
    transfer_id: bytes,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    timeout: float = 30.0,
    hmac_key: bytes | None = None,
    stop: Callable[[], bool] | None = None,
    on_acknowledged: Callable[[int], None] | None = None,
) -> int:
    """Publish an archive in chunks at QoS 1 and return the chunks sent.

    Each chunk waits for the broker's acknowledgement before the next is
    sent, so a slow link is not flooded. With ``hmac_key`` every chunk is
    signed for the OTA topic, as devices with a key require. ``stop`` is
    called before each chunk; when it returns True the rest is not sent
    (for example once the device rejected the transfer).
    ``on_acknowledged`` receives the number of chunks acknowledged so far
    after each acknowledgement.

    Raises:
        BrokerError: a chunk was not acknowledged within ``timeout`` seconds.
    """
    chunk_topic, _ = ota_topics(topics)
    chunks = split_archive(archive, chunk_bytes, transfer_id)
    for index, chunk in enumerate(chunks):
        if stop is not None and stop():
            return index
        if hmac_key is not None:
            chunk = sign(hmac_key, chunk_topic, chunk)
        info = client.publish(chunk_topic, chunk, qos=1)
        info.wait_for_publish(timeout=timeout)
        if not info.is_published():
            raise BrokerError(
                f"chunk {index} of {len(chunks)} for transfer {transfer_id.hex()} "
                f"was not acknowledged within {timeout:g} s; check the broker "
                "connection and send the bundle again"
            )
        if on_acknowledged is not None:
            on_acknowledged(index + 1)
    return len(chunks)


class StatusWatcher:
    """Collects the first final OTA status of each transfer from one device.

    Args:
        client: a connected paho client with its network loop running; the
            watcher sets its ``on_subscribe`` callback.
        topics: the device's topics.
    """

    def __init__(self, client: Any, topics: Topics):
        _, self.topic = ota_topics(topics)
        self._client = client
        self._outcomes: dict[str, dict[str, Any]] = {}
        self._changed = threading.Condition()
        self._subscribed = threading.Event()
        self._rejection: str | None = None

    def subscribe(self, timeout: float) -> None:
        """Subscribe to the status topic and wait for the broker's SUBACK.

        Raises:
            BrokerError: no SUBACK within ``timeout`` seconds, or the broker
                rejected the subscription.
        """
        self._client.message_callback_add(self.topic, self._on_message)
        self._client.on_subscribe = self._on_subscribe
        # The client starts a clean session, so a reconnect loses the
        # subscription. The device retains its last status, so subscribing
        # again delivers an outcome published while the client was away.
        self._client.on_connect = self._on_reconnect
        self._client.subscribe(self.topic, qos=1)
        if not self._subscribed.wait(timeout):
            raise BrokerError(
                f"the broker did not acknowledge the subscription to {self.topic} "
                f"within {timeout:g} s; check the broker connection"
            )
        if self._rejection is not None:
            raise BrokerError(
                f"the broker rejected the subscription to {self.topic} "
                f"({self._rejection}); give the hub user read access to it"
            )

    def outcome(self, transfer_id: str) -> dict[str, Any] | None:
        """Return the final status of a transfer, or None while there is none."""
        with self._changed:
            return self._outcomes.get(transfer_id)

    def wait(self, transfer_id: str, timeout: float) -> dict[str, Any] | None:
        """Wait up to ``timeout`` seconds for the final status of a transfer."""
        with self._changed:
            self._changed.wait_for(lambda: transfer_id in self._outcomes, timeout)
            return self._outcomes.get(transfer_id)

    def _on_subscribe(
        self, _client: Any, _userdata: Any, _mid: int, codes: Any, *_: Any
    ) -> None:
        failed = [code for code in codes if code.is_failure]
        if failed:
            self._rejection = str(failed[0])
        self._subscribed.set()

    def _on_reconnect(self, client: Any, *_: Any) -> None:
        client.subscribe(self.topic, qos=1)

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        try:
            status = parse_json(message.payload)
        except ValueError as error:
            logger.warning(
                "Ignoring a status on %s that is not JSON: %s", self.topic, error
            )
            return
        if not isinstance(status, dict) or status.get("state") not in FINAL_STATES:
            return
        transfer = status.get("transfer")
        if not isinstance(transfer, str):
            return
        with self._changed:
            self._outcomes.setdefault(transfer, status)
            self._changed.notify_all()


# The sender's next step for each device reason whose detail names no fix.
NEXT_STEPS = {
    "too_large": "shrink the model or install it with 'dslo-edge flash'",
    "malformed": "the chunks do not follow the device's chunk format, so send the "
    "bundle with the 'dslo-edge ota-send' of the device's dslo-edge version",
    "bad_signature": "send it again with --hmac-key-file set to this device's key, "
    "the file that its security.hmac_key_file names",
    "bad_bundle": "check the bundle with 'dslo-edge inspect BUNDLE', and send a "
    "bundle directory that 'dslo-edge convert' wrote",
    "health_check": "the new student returns outputs that are not finite "
    "probabilities or has weights that are not finite, so convert the model "
    "again (with a softmax output) and send it again",
    "install_failed": "the device hit an unexpected error and logged its "
    "traceback: read the device's log, then send the bundle again",
}
# Device reasons whose detail already ends with the fix, so nothing is added.
REASONS_WITH_FIX = (
    "unsigned",
    "unexpected_signature",
    "checksum_mismatch",
    "replaced",
    "model_mismatch",
    "config_mismatch",
    "state_dir_invalid",
    "state_dir_write_failed",
)


def _next_step(reason: str) -> str:
    """Return "; " and the next step for a reason, or "" if its detail has one."""
    if reason in REASONS_WITH_FIX:
        return ""
    step = NEXT_STEPS.get(
        reason, "this dslo-edge version does not know the reason: read the device's log"
    )
    return f"; {step}"


def check_outcome(
    status: dict[str, Any] | None,
    topics: Topics,
    device_id: str,
    transfer_id: str,
    timeout: float,
) -> str:
    """Return a line for an installed release, or raise for any other outcome.

    Raises:
        OtaError: the device rejected or rolled back the transfer (with its
            reason), or sent no outcome (``timeout``).
    """
    if status is None:
        raise OtaError(
            "timeout",
            f"device {device_id} reported no outcome for transfer {transfer_id} "
            f"within {timeout:g} s; check that it is online ({topics.status}) "
            f"and read {ota_topics(topics)[1]}, or raise --timeout for a large "
            "bundle on a slow device",
        )
    reason = status.get("reason") or "unknown"
    detail = status.get("detail") or "no detail"
    step = _next_step(reason)
    if status["state"] == "rejected":
        raise OtaError(
            reason,
            f"device {device_id} rejected transfer {transfer_id}: {reason}: "
            f"{detail}{step}",
        )
    if status["state"] == "rolled_back":
        running = status.get("release") or "its factory bundle"
        raise OtaError(
            reason,
            f"device {device_id} rolled back transfer {transfer_id} and runs "
            f"{running} again: {reason}: {detail}{step}",
        )
    return f"device {device_id} installed release {status.get('release')}"
