"""Hub side of over-the-air model updates: pack and send a bundle.

``pack_bundle`` packs only the files of a bundle and checks the archive
against the size a device accepts, before anything is published.
``send_archive`` publishes the chunks (format in ``dslo_edge.ota``).
"""

from __future__ import annotations

import io
import logging
import tarfile
import uuid
from pathlib import Path
from typing import Any

from dslo_edge.bundle import MANIFEST_NAME, Bundle, load_bundle
from dslo_edge.errors import BrokerError, BundleError
from dslo_edge.health import PROBE_FILE
from dslo_edge.ota import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_ARCHIVE_BYTES,
    MAX_ARCHIVE_MEMBERS,
    ota_topics,
    split_archive,
)
from dslo_edge.protocol import Topics
from dslo_edge.signing import sign

logger = logging.getLogger(__name__)


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
    for key, entry in bundle.manifest.items():
        if isinstance(entry, dict) and "file" in entry:
            name = str(entry["file"])
            if "/" in name or name in ("", ".", ".."):
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
    max_archive_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES,
) -> bytes:
    """Return a tar archive of a verified bundle.

    Only the files of ``bundle_files`` are packed. Member order, owners and
    times are fixed, so the same bundle always packs to the same bytes and
    the same sha256.

    Args:
        bundle_dir: the bundle directory.
        max_archive_bytes: the largest archive the device accepts, 64 MiB
            for ``OtaReceiver``'s default.

    Raises:
        BundleError: the directory is not a valid bundle, or the archive
            would exceed ``max_archive_bytes``.
    """
    bundle = load_bundle(bundle_dir)
    paths = bundle_files(bundle)
    if len(paths) > MAX_ARCHIVE_MEMBERS:
        raise BundleError(
            f"bundle {bundle.path} has {len(paths)} files; a device accepts at most "
            f"{MAX_ARCHIVE_MEMBERS}"
        )
    # The files alone are a lower bound of the archive size, so a bundle far
    # above the limit is rejected before its files are read.
    content = sum(path.stat().st_size for path in paths)
    _check_archive_size(bundle.path, content, max_archive_bytes)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for path in paths:
            with open(path, "rb") as stream:
                archive.addfile(_member(path.name, path.stat().st_size), stream)
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
) -> str:
    """Pack a bundle, publish it in chunks and return the transfer id in hex.

    Raises:
        BundleError: the directory is not a valid bundle or is too large.
        BrokerError: a chunk was not acknowledged within ``timeout`` seconds.
    """
    archive = pack_bundle(bundle_dir)
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
) -> int:
    """Publish an archive in chunks at QoS 1 and return the chunks sent.

    Each chunk waits for the broker's acknowledgement before the next is
    sent, so a slow link is not flooded. With ``hmac_key`` every chunk is
    signed for the OTA topic, as devices with a key require.

    Raises:
        BrokerError: a chunk was not acknowledged within ``timeout`` seconds.
    """
    chunk_topic, _ = ota_topics(topics)
    chunks = split_archive(archive, chunk_bytes, transfer_id)
    for index, chunk in enumerate(chunks):
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
    return len(chunks)
