"""The fault scenarios and the table that ``dslo-edge selftest --faults`` prints."""

from __future__ import annotations

import logging
import re
import shutil
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dslo_edge.applied_ids import AppliedIds
from dslo_edge.broker import Broker, free_port
from dslo_edge.bundle import Bundle, load_bundle
from dslo_edge.checkpoint import list_checkpoints, load_latest_checkpoint
from dslo_edge.config import render_config
from dslo_edge.daemon import APPLIED_IDS
from dslo_edge.errors import BrokerError
from dslo_edge.faults import (
    DEVICE,
    WAIT_S,
    DaemonProcess,
    FinalState,
    Publisher,
    Row,
    TcpProxy,
    make_updates,
)
from dslo_edge.protocol import Topics, encode_update
from dslo_edge.signing import generate_key_file, load_key, sign

logger = logging.getLogger(__name__)

# Short backoff and idle times keep the suite fast; the logic is the same.
FAST_SETTINGS: dict[str, dict[str, Any]] = {
    "mqtt": {"reconnect_min_s": 0.2, "reconnect_max_s": 2.0, "keepalive": 5},
    "training": {
        "checkpoint_every": 10,
        "queue_size": 64,
        "checkpoint_idle_s": 0.5,
        "metrics_every": 5,
    },
}


@dataclass
class Scale:
    """Load of each scenario; the defaults produce the published table."""

    updates: int = 1000
    kills: int = 20
    fuzz: int = 10_000

    @classmethod
    def quick(cls) -> Scale:
        return cls(updates=200, kills=5, fuzz=1000)


class Suite:
    """Shared setup: a work folder, the bundle and one config per scenario."""

    def __init__(self, workdir: Path, bundle_path: Path, scale: Scale):
        self.workdir = workdir
        self.bundle_path = bundle_path
        self.bundle: Bundle = load_bundle(bundle_path)
        self.scale = scale
        self.topics = Topics.for_device(DEVICE)
        self.brokers: list[Broker] = []
        self.daemons: list[DaemonProcess] = []
        self._seed = 0

    def folder(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def broker(self, name: str, port: int | None = None) -> Broker:
        broker = Broker.start(
            port=port,
            kind="mosquitto",
            workdir=self.folder(name) / "broker",
            persistence=True,
        )
        self.brokers.append(broker)
        return broker

    def config(
        self,
        name: str,
        port: int,
        state_dir: Path | None = None,
        **sections: dict[str, Any],
    ) -> Path:
        folder = self.folder(name)
        overrides = {key: dict(value) for key, value in FAST_SETTINGS.items()}
        for section, values in sections.items():
            overrides.setdefault(section, {}).update(values)
        path = folder / "device.toml"
        state = state_dir or folder / "state"
        path.write_text(
            render_config(
                DEVICE, self.bundle_path.resolve(), state, port, overrides=overrides
            )
        )
        return path

    def daemon(self, config: Path) -> DaemonProcess:
        process = DaemonProcess(config, config.parent / "daemon.log")
        self.daemons.append(process)
        return process

    def updates(self, count: int) -> list[bytes]:
        self._seed += 1
        return [encode_update(u) for u in make_updates(self.bundle, count, self._seed)]

    def close(self) -> None:
        for daemon in self.daemons:
            if daemon.alive():
                daemon.kill()
        for broker in self.brokers:
            broker.stop()


def read_final_state(config: Path) -> FinalState:
    state_dir = config.parent / "state"
    checkpoint = load_latest_checkpoint(state_dir / "checkpoints")
    if checkpoint is None:
        return FinalState(set(), 0, {})
    record = AppliedIds.from_array(checkpoint.tensors[APPLIED_IDS], 10_000_000)
    ids = {bytes(row) for row in record.to_array()}
    return FinalState(
        ids,
        int(checkpoint.state["applied_updates"]),
        checkpoint.state.get("rejected", {}),
    )


def _ids(payloads: list[bytes]) -> set[bytes]:
    # The message id sits at bytes 6..22 of a version-1 payload.
    return {p[6:22] for p in payloads}


def make_row(
    name: str,
    sent: int,
    valid: list[bytes],
    final: FinalState,
    detail: str = "",
    valid_ids: set[bytes] | None = None,
) -> Row:
    """Count applied, twice-applied and lost updates among ``valid``.

    ``valid_ids`` replaces the ids read from the bytes of unsigned payloads.
    """
    valid_ids = valid_ids if valid_ids is not None else _ids(valid)
    applied = len(valid_ids & final.applied_ids)
    row = Row(
        scenario=name,
        sent=sent,
        applied=applied,
        rejected=sum(final.rejected.values()),
        applied_twice=final.applied_total - len(final.applied_ids),
        lost=len(valid_ids) - applied,
        detail=detail,
    )
    if final.rejected:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(final.rejected.items()))
        row.detail = (
            f"{detail}; rejected: {reasons}" if detail else f"rejected: {reasons}"
        )
    row.passed = row.applied_twice == 0 and row.lost == 0
    return row


def _processed_at_least(count: int) -> Callable[[dict[str, Any]], bool]:
    return lambda metrics: metrics.get("processed", 0) >= count


def _processed_changed_from(seen: object) -> Callable[[dict[str, Any]], bool]:
    return lambda metrics: metrics.get("processed") != seen


def wait_applied(hub: Publisher, total: int, daemon: DaemonProcess) -> dict[str, Any]:
    """Wait until this daemon process reports ``total`` applied updates.

    Metrics are retained, so a report from a killed process can still be on
    the broker; the pid check skips it.
    """
    return hub.wait(
        lambda m: m.get("pid") == daemon.pid and m.get("applied_total", 0) >= total
    )


def scenario_broker_restart(suite: Suite) -> Row:
    broker = suite.broker("broker-restart")
    config = suite.config("broker-restart", broker.port)
    daemon = suite.daemon(config).start()
    hub = Publisher(broker.port, suite.topics)
    payloads = suite.updates(100)
    hub.wait(lambda m: True)
    hub.publish(payloads[:50])
    broker.restart()
    hub.publish(payloads[50:])
    metrics = wait_applied(hub, 100, daemon)
    hub.close()
    daemon.terminate()
    detail = f"device connected {metrics['connects']} times"
    return make_row("broker restart", 100, payloads, read_final_state(config), detail)


def scenario_broker_down_at_boot(suite: Suite) -> Row:
    port = free_port()
    config = suite.config("broker-down", port)
    daemon = suite.daemon(config).start()
    time.sleep(4.0)
    backoff_lines = daemon.log_text().count("reconnecting in")
    pid = daemon.pid
    started = time.monotonic()
    broker = suite.broker("broker-down", port=port)
    hub = Publisher(broker.port, suite.topics)
    hub.wait(lambda m: True)
    connect_s = time.monotonic() - started
    payloads = suite.updates(50)
    hub.publish(payloads)
    wait_applied(hub, 50, daemon)
    hub.close()
    same_process = daemon.alive() and daemon.pid == pid
    daemon.terminate()
    detail = (
        f"{backoff_lines} backoff lines in 4 s, connected {connect_s:.1f} s after "
        f"the broker started (backoff max 2 s), same pid: {same_process}"
    )
    row = make_row(
        "broker down at boot", 50, payloads, read_final_state(config), detail
    )
    row.passed = row.passed and same_process and connect_s <= 2.0 + 1.5
    return row


def scenario_network_outage(suite: Suite) -> Row:
    broker = suite.broker("network-outage")
    proxy = TcpProxy(broker.port)
    config = suite.config("network-outage", proxy.port)
    daemon = suite.daemon(config).start()
    hub = Publisher(broker.port, suite.topics)
    payloads = suite.updates(70)
    hub.wait(lambda m: True)
    hub.publish(payloads[:30])
    time.sleep(0.3)
    proxy.down()
    hub.publish(payloads[30:])
    time.sleep(3.0)
    proxy.up()
    metrics = wait_applied(hub, 70, daemon)
    hub.close()
    daemon.terminate()
    proxy.down()
    detail = f"3 s outage, device connected {metrics['connects']} times"
    return make_row("network outage", 70, payloads, read_final_state(config), detail)


def scenario_sigkill(suite: Suite) -> Row:
    broker = suite.broker("sigkill")
    config = suite.config("sigkill", broker.port)
    daemon = suite.daemon(config).start()
    hub = Publisher(broker.port, suite.topics)
    total, kills = suite.scale.updates, suite.scale.kills
    payloads = suite.updates(total)
    rng = np.random.default_rng(7)
    step = max(1, total // kills)
    hub.wait(lambda m: True)
    sent = killed = 0
    while sent < total or killed < kills:
        hub.publish(payloads[sent : sent + step])
        sent = min(total, sent + step)
        time.sleep(float(rng.uniform(0.05, 0.8)))
        if killed < kills:
            daemon.kill()
            killed += 1
            daemon.start()
    wait_applied(hub, total, daemon)
    hub.close()
    daemon.terminate()
    detail = f"{killed} SIGKILLs at random points"
    return make_row(
        f"SIGKILL x{killed} during {total} updates",
        total,
        payloads,
        read_final_state(config),
        detail,
    )


def _damage_newest(config: Path, how: str) -> str:
    folder = config.parent / "state" / "checkpoints"
    _, newest = list_checkpoints(folder)[0]
    data = bytearray(newest.read_bytes())
    if how == "truncate":
        newest.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[-64] ^= 0xFF  # inside the tensor data, so the checksum fails
        newest.write_bytes(bytes(data))
    return newest.name


def scenario_damaged_checkpoint(suite: Suite, how: str) -> Row:
    name = f"checkpoint-{how}"
    broker = suite.broker(name)
    config = suite.config(name, broker.port)
    daemon = suite.daemon(config).start()
    hub = Publisher(broker.port, suite.topics)
    payloads = suite.updates(100)
    hub.wait(lambda m: True)
    hub.publish(payloads[:60])
    wait_applied(hub, 60, daemon)
    daemon.kill()
    damaged = _damage_newest(config, how)
    daemon.start()
    hub.publish(payloads[60:])
    wait_applied(hub, 100, daemon)
    hub.close()
    daemon.terminate()
    log = daemon.log_text()
    restored = re.findall(r"restored (checkpoint-\d+\.safetensors)", log)
    skipped = "Skipping unreadable checkpoint" in log
    damage = "truncated" if how == "truncate" else "corrupted"
    detail = (
        f"newest generation {damaged} {damage} after a SIGKILL; skipped: {skipped}; "
        f"restored {restored[-1] if restored else 'nothing'}"
    )
    label = "truncated checkpoint" if how == "truncate" else "corrupt checkpoint"
    row = make_row(label, 100, payloads, read_final_state(config), detail)
    row.passed = row.passed and skipped
    return row


def scenario_disk_full(suite: Suite) -> Row:
    folder = suite.folder("disk-full")
    mount = folder / "state"
    mount.mkdir(exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        return Row(
            "disk full",
            detail=f"skipped: cannot mount a tmpfs ({result.stderr.strip()})",
        )
    try:
        return _disk_full(suite, folder, mount)
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(mount: Path, leave_bytes: int) -> Path:
    filler = mount / "filler"
    stat = __import__("os").statvfs(mount)
    size = max(0, stat.f_bavail * stat.f_frsize - leave_bytes)
    with open(filler, "wb") as stream:
        stream.write(b"\0" * size)
    return filler


def _disk_full(suite: Suite, folder: Path, mount: Path) -> Row:
    broker = suite.broker("disk-full")
    config = suite.config("disk-full", broker.port, state_dir=mount)
    daemon = suite.daemon(config).start()
    hub = Publisher(broker.port, suite.topics)
    payloads = suite.updates(50)
    hub.wait(lambda m: True)
    hub.publish(payloads[:10])
    hub.wait(lambda m: m.get("applied_total", 0) >= 10 and m.get("unacknowledged") == 0)
    filler = _fill(mount, 4096)
    hub.publish(payloads[10:40])
    failing = hub.wait(
        lambda m: m.get("applied_total", 0) >= 40 and m.get("storage_error")
    )
    intact = load_latest_checkpoint(mount / "checkpoints") is not None
    filler.unlink()
    hub.publish(payloads[40:])
    hub.wait(
        lambda m: (
            m.get("applied_total", 0) >= 50
            and not m.get("storage_error")
            and m.get("unacknowledged") == 0
        )
    )
    hub.close()
    daemon.terminate()
    final = read_final_state_at(mount)
    detail = (
        f"status showed '{failing['storage_error']}'; training went on to "
        f"{failing['applied_total']} updates; old checkpoint intact: {intact}; "
        "saved again after space returned"
    )
    row = make_row("disk full", 50, payloads, final, detail)
    row.passed = row.passed and intact
    return row


def read_final_state_at(state_dir: Path) -> FinalState:
    checkpoint = load_latest_checkpoint(state_dir / "checkpoints")
    assert checkpoint is not None
    ids = {bytes(row) for row in checkpoint.tensors[APPLIED_IDS]}
    return FinalState(
        ids,
        int(checkpoint.state["applied_updates"]),
        checkpoint.state.get("rejected", {}),
    )


def scenario_duplicate_client_id(suite: Suite) -> Row:
    broker = suite.broker("duplicate-id")
    shared = {"client_id": "dslo-device-shared-id"}
    config_a = suite.config("duplicate-id/a", broker.port, mqtt=shared)
    config_b = suite.config("duplicate-id/b", broker.port, mqtt=shared)
    first = suite.daemon(config_a).start()
    hub = Publisher(broker.port, suite.topics)
    hub.wait(lambda m: True)
    second = suite.daemon(config_b).start()
    time.sleep(8.0)
    second.terminate()
    payloads = suite.updates(30)
    hub.publish(payloads)
    wait_applied(hub, 30, first)
    hub.close()
    first.terminate()
    logs = first.log_text() + second.log_text()
    takeovers = logs.count("session taken over")
    connects = logs.count(" connected to ")
    detail = f"{takeovers} takeovers logged, {connects} connects in 8 s (no hot loop)"
    row = make_row(
        "duplicate client id", 30, payloads, read_final_state(config_a), detail
    )
    row.passed = row.passed and takeovers >= 1 and connects <= 30
    return row


def fuzz_payloads(valid: list[bytes], count: int, seed: int) -> list[bytes]:
    """Random bytes, truncations, bit flips, overwrites and header tampering."""
    rng = np.random.default_rng(seed)
    out: list[bytes] = []
    for index in range(count):
        base = bytearray(valid[index % len(valid)])
        kind = index % 5
        if kind == 0:
            out.append(rng.bytes(int(rng.integers(0, 2000))))
        elif kind == 1:
            out.append(bytes(base[: int(rng.integers(0, len(base)))]))
        elif kind == 2:
            for _ in range(int(rng.integers(1, 9))):
                position = int(rng.integers(0, len(base)))
                base[position] ^= 1 << int(rng.integers(0, 8))
            out.append(bytes(base))
        elif kind == 3:
            start = int(rng.integers(0, len(base)))
            length = int(rng.integers(1, 64))
            base[start : start + length] = rng.bytes(length)
            out.append(bytes(base[: len(base)]))
        else:
            field = int(rng.integers(0, 3))
            if field == 0:
                struct.pack_into("<I", base, 34, int(rng.integers(0, 2**32)))
            elif field == 1:
                base[38] = int(rng.integers(0, 256))
            else:
                base[4] = int(rng.integers(0, 256))
            out.append(bytes(base))
    return out


# Seconds without a new processed update after which the device is idle.
QUIET_S = 2.0


def scenario_fuzz(suite: Suite) -> Row:
    broker = suite.broker("fuzz")
    config = suite.config("fuzz", broker.port)
    daemon = suite.daemon(config).start()
    hub = Publisher(broker.port, suite.topics)
    valid = suite.updates(200)
    fuzzed = fuzz_payloads(valid[:100], suite.scale.fuzz, seed=11)
    hub.wait(lambda m: True)
    hub.publish(valid[:100])
    wait_applied(hub, 100, daemon)
    chunk = 100
    for start in range(0, len(fuzzed), chunk):
        hub.publish(fuzzed[start : start + chunk])
        hub.wait(_processed_at_least(100 + start))
    hub.publish(valid[100:])
    total = len(valid) + len(fuzzed)
    hub.wait(lambda m: m.get("processed", 0) >= total)
    # Copies that the broker sends again after a full queue count as
    # processed too, so the count can reach the total before the last valid
    # updates are applied. Waiting until the count stops growing covers them.
    wait_quiet(hub, QUIET_S)
    hub.close()
    daemon.terminate()
    final = read_final_state(config)
    mutants_applied = final.applied_total - len(_ids(valid) & final.applied_ids)
    detail = (
        f"{mutants_applied} mutants were well-formed new updates "
        "(a changed id byte) and were applied once"
    )
    row = make_row(f"{len(fuzzed)} fuzzed payloads", total, valid, final, detail)
    # Every mutant was rejected or applied. Redelivered copies add duplicate
    # rejections on top, so the sum may exceed the number of mutants.
    row.passed = row.passed and row.rejected + mutants_applied >= len(fuzzed)
    return row


def wait_quiet(hub: Publisher, quiet_s: float) -> dict[str, Any]:
    """Wait until the device's processed count has not grown for ``quiet_s``.

    Returns the last metrics report. The device reports at least once after
    its queue stays empty, so a quiet period means it has nothing left.
    """
    deadline = time.monotonic() + WAIT_S
    metrics = hub.wait(lambda m: True)
    while time.monotonic() < deadline:
        seen = metrics.get("processed")
        try:
            metrics = hub.wait(_processed_changed_from(seen), quiet_s)
        except BrokerError:
            return metrics
    raise BrokerError(
        f"device kept processing for {WAIT_S:.0f} s; last metrics: {metrics}"
    )


def scenario_unsigned_and_replayed(suite: Suite) -> Row:
    folder = suite.folder("signed")
    key_path, other_path = folder / "device.key", folder / "other.key"
    for path in (key_path, other_path):
        path.unlink(missing_ok=True)
        generate_key_file(path)
    key, other = load_key(key_path), load_key(other_path)
    broker = suite.broker("signed")
    config = suite.config(
        "signed", broker.port, security={"hmac_key_file": str(key_path)}
    )
    daemon = suite.daemon(config).start()
    hub = Publisher(broker.port, suite.topics)
    topic = suite.topics.updates
    plain = suite.updates(110)
    signed = [sign(key, topic, body) for body in plain[:50]]
    unsigned = plain[50:70]
    wrong_key = [sign(other, topic, body) for body in plain[70:90]]
    other_topic = [
        sign(key, "dslo/other-device/updates", body) for body in plain[90:110]
    ]
    hub.wait(lambda m: True)
    hub.publish(signed)
    wait_applied(hub, 50, daemon)
    hub.publish(unsigned + wrong_key + other_topic + signed[:20])
    hub.publish(signed[20:21], retain=True)
    total = 50 + 20 + 20 + 20 + 20 + 1
    hub.wait(lambda m: m.get("processed", 0) >= total)
    hub.close()
    daemon.terminate()
    row = make_row(
        "unsigned and replayed updates",
        total,
        signed,
        read_final_state(config),
        valid_ids=_ids(plain[:50]),
    )
    row.passed = row.passed and row.rejected == total - 50
    return row


SCENARIOS: dict[str, Callable[[Suite], Row]] = {
    "broker-restart": scenario_broker_restart,
    "broker-down-at-boot": scenario_broker_down_at_boot,
    "network-outage": scenario_network_outage,
    "sigkill": scenario_sigkill,
    "corrupt-checkpoint": lambda suite: scenario_damaged_checkpoint(suite, "corrupt"),
    "truncated-checkpoint": lambda suite: scenario_damaged_checkpoint(
        suite, "truncate"
    ),
    "disk-full": scenario_disk_full,
    "duplicate-client-id": scenario_duplicate_client_id,
    "fuzz": scenario_fuzz,
    "unsigned-and-replayed": scenario_unsigned_and_replayed,
}


def run_suite(
    workdir: Path,
    bundle: Path,
    scale: Scale,
    names: list[str] | None = None,
    on_row: Callable[[Row], None] | None = None,
) -> list[Row]:
    """Run the named scenarios (all by default) and return their rows.

    Scenario folders left in ``workdir`` by an earlier run are removed first,
    because their checkpoints and broker sessions would change the counts.
    """
    _remove_old_runs(workdir)
    suite = Suite(workdir, bundle, scale)
    rows = []
    try:
        for name in names or list(SCENARIOS):
            started = time.monotonic()
            try:
                row = SCENARIOS[name](suite)
            except Exception as error:  # a failed scenario is a red row, not a crash
                logger.exception("Scenario %s failed", name)
                row = Row(name, detail=f"error: {error}", passed=False)
            row.detail += f" [{time.monotonic() - started:.0f} s]"
            rows.append(row)
            if on_row:
                on_row(row)
    finally:
        suite.close()
    return rows


# The folders the scenarios create; only these are removed before a run.
SCENARIO_FOLDERS = (
    "broker-restart",
    "broker-down",
    "network-outage",
    "sigkill",
    "checkpoint-corrupt",
    "checkpoint-truncate",
    "disk-full",
    "duplicate-id",
    "fuzz",
    "signed",
)


def _remove_old_runs(workdir: Path) -> None:
    for name in SCENARIO_FOLDERS:
        folder = workdir / name
        if folder.is_dir():
            shutil.rmtree(folder)


def format_table(rows: list[Row]) -> str:
    """Return the rows as a markdown table."""
    header = "scenario | sent | applied | rejected | applied twice | lost | result"
    lines = [f"| {header} | detail |", "|---|---:|---:|---:|---:|---:|---|---|"]
    for row in rows:
        result = "pass" if row.passed else "FAIL"
        lines.append(
            f"| {row.scenario} | {row.sent} | {row.applied} | {row.rejected} | "
            f"{row.applied_twice} | {row.lost} | {result} | {row.detail} |"
        )
    return "\n".join(lines)
