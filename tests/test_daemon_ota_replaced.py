"""A transfer that a newer one replaces gets its own outcome from the daemon."""

from __future__ import annotations

import uuid

import pytest

from dslo_edge.ota import OtaError, ota_topics, split_archive
from dslo_edge.ota_sender import check_outcome, pack_bundle
from dslo_edge.protocol import Topics
from tests.test_daemon_ota import (
    DEVICE,
    hub_client,
    start_daemon,
    status_listener,
    wait_until,
)


def test_interleaved_transfers_reject_first(mlp_pair, mosquitto, tmp_path) -> None:
    archive = pack_bundle(mlp_pair.bundle)
    first_id, second_id = uuid.uuid4().bytes, uuid.uuid4().bytes
    first = split_archive(archive, 8192, first_id)
    second = split_archive(archive, 8192, second_id)
    daemon = start_daemon(tmp_path, mlp_pair.bundle, mosquitto)
    listener, statuses = status_listener(mosquitto)
    hub = hub_client(mosquitto)
    chunk_topic = ota_topics(Topics.for_device(DEVICE))[0]
    try:
        # Two senders at once: their chunks reach the device in turns.
        for first_chunk, second_chunk in zip(first, second, strict=True):
            for chunk in (first_chunk, second_chunk):
                hub.publish(chunk_topic, chunk, qos=1).wait_for_publish(10)
        wait_until(lambda: any(s["state"] == "installed" for s in statuses))
        bundle_after = daemon.bundle.path
        outcomes = daemon.status_report()["model_updates"]
    finally:
        daemon.stop()
        for client in (hub, listener):
            client.loop_stop()
            client.disconnect()

    assert len(first) > 2
    assert [(s["transfer"], s["state"]) for s in statuses] == [
        (first_id.hex(), "rejected"),
        (second_id.hex(), "installed"),
    ]
    replaced = statuses[0]
    assert replaced["reason"] == "replaced"
    assert replaced["detail"] == (
        f"model transfer {first_id.hex()} was replaced by transfer "
        f"{second_id.hex()}, which started before all chunks of {first_id.hex()} "
        "arrived, so its chunks are discarded; send one release at a time, "
        "waiting until ota-send reports the outcome of one before sending the "
        "next, then send this release again if the device should install it"
    )
    assert outcomes == {
        "installed": 1,
        "rejected": {"replaced": 1},
        "rolled_back": {},
    }
    assert bundle_after.parent == tmp_path / "state" / "bundles"


def test_ota_send_prints_replaced_detail() -> None:
    detail = "model transfer ab12 was replaced by transfer cd34, ...; send one ..."
    status = {
        "state": "rejected",
        "transfer": "ab12",
        "reason": "replaced",
        "detail": detail,
    }

    with pytest.raises(OtaError) as caught:
        check_outcome(status, Topics.for_device(DEVICE), DEVICE, "ab12", 5)

    assert caught.value.reason == "replaced"
    # The detail ends with the fix, so ota-send adds no next step.
    assert str(caught.value) == (
        f"device {DEVICE} rejected transfer ab12: replaced: {detail}"
    )
