"""Hub configuration, shared hub state and the hub's systemd unit."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dslo_edge.bundle import load_bundle
from dslo_edge.cli import main
from dslo_edge.errors import ConfigError
from dslo_edge.hub_config import RateLimit, load_hub_config
from dslo_edge.hub_state import (
    ADMITTED,
    BUDGET_EXHAUSTED,
    CACHED,
    IN_PROGRESS,
    RATE_LIMITED,
    HubState,
    RequestKey,
)
from dslo_edge.service import render_hub_unit, render_unit
from tests.bundle_files import write_bundle
from tests.hub_fleet import write_hub_config


def write_config(tmp_path: Path, extra: str = "") -> Path:
    (tmp_path / "teacher.tflite").write_bytes(b"model")
    (tmp_path / "data.npz").write_bytes(b"npz")
    path = tmp_path / "hub.toml"
    path.write_text(
        '[hub]\nworker_id = "w1"\n[teacher]\npath = "teacher.tflite"\n'
        'output_kind = "logits"\n' + extra
    )
    return path


def test_defaults_and_override(tmp_path) -> None:
    config = load_hub_config(write_config(tmp_path), worker_id="w7")
    assert config.worker_id == "w7"
    assert config.client_id == "dslo-hub-w7"
    assert config.group == "dslo-hub"
    assert config.mqtt.session_expiry_s == 300
    assert config.state_file == tmp_path / "hub-state.sqlite"
    assert config.teacher.path == tmp_path / "teacher.tflite"
    assert config.privacy is None
    assert config.pushes == ()
    assert config.watchdog_stall_s == 300.0


def write_stall_config(tmp_path: Path, value: str) -> Path:
    """Write a config whose [hub] table sets watchdog_stall_s = value."""
    path = write_config(tmp_path)
    hub = f'worker_id = "w1"\nwatchdog_stall_s = {value}\n'
    path.write_text(path.read_text().replace('worker_id = "w1"\n', hub))
    return path


@pytest.mark.parametrize(
    ("value", "seconds"), [("1", 1.0), ("2.5", 2.5), ("86400", 86400.0)]
)
def test_watchdog_stall_in_range_read(tmp_path, value: str, seconds: float) -> None:
    config = load_hub_config(write_stall_config(tmp_path, value))
    assert config.watchdog_stall_s == seconds


@pytest.mark.parametrize(
    ("value", "shown"),
    [("0.5", "0.5"), ("0", "0.0"), ("86401", "86401.0"), ("-300", "-300.0")],
)
def test_watchdog_stall_out_of_range_rejected(tmp_path, value, shown) -> None:
    path = write_stall_config(tmp_path, value)

    with pytest.raises(ConfigError) as caught:
        load_hub_config(path)

    assert str(caught.value) == (
        f"{path}: hub.watchdog_stall_s = {shown} is invalid; expected seconds in "
        "1..86400; set a value in that range, or remove the key to use the "
        "default 300"
    )


PUSH = (
    '[[push]]\nname = "nightly"\ndevices = ["a", "b"]\ndata = "data.npz"\n'
    "every_s = 3600\n"
)


def write_push_files(tmp_path: Path, mlp_pair, input_width: int = 64) -> None:
    """Replace the placeholder teacher and data with real ones."""
    shutil.copy(load_bundle(mlp_pair.bundle).teacher_path, tmp_path / "teacher.tflite")
    x = np.zeros((4, input_width), dtype=np.float32)
    np.savez(tmp_path / "data.npz", x=x)


@pytest.mark.parametrize(
    ("table", "key", "expected"),
    [
        ("hub", "metrics_every_s", "finite seconds > 0"),
        ("teacher", "reload_poll_s", "finite seconds > 0"),
        ("requests", "claim_timeout_s", "finite seconds > 0"),
        ("requests", "answered_ttl_s", "finite seconds > 0"),
        ("rate_limit", "requests_per_s", "finite requests per second > 0"),
        ("privacy", "noise_multiplier", "a finite number > 0"),
        ("privacy", "epsilon_budget", "a finite number > 0"),
        ("push", "every_s", "finite seconds > 0"),
    ],
)
def test_infinite_float_expects_finite(tmp_path, table, key, expected) -> None:
    (tmp_path / "teacher.tflite").write_bytes(b"model")
    (tmp_path / "data.npz").write_bytes(b"npz")
    tables = {
        "[hub]": {"worker_id": '"w1"'},
        "[teacher]": {"path": '"teacher.tflite"', "output_kind": '"logits"'},
        "[privacy]": {"noise_multiplier": "2.0", "epsilon_budget": "8.0"},
        "[[push]]": {
            "name": '"nightly"',
            "devices": '["a"]',
            "data": '"data.npz"',
            "every_s": "3600",
        },
    }
    header = "[[push]]" if table == "push" else f"[{table}]"
    tables.setdefault(header, {})[key] = "inf"
    path = tmp_path / "hub.toml"
    path.write_text(
        "".join(
            name + "\n" + "".join(f"{k} = {v}\n" for k, v in values.items())
            for name, values in tables.items()
        )
    )

    with pytest.raises(ConfigError) as caught:
        load_hub_config(path)

    shown = "push[0]" if table == "push" else table
    assert str(caught.value) == (
        f"{path}: {shown}.{key} = inf is invalid; expected {expected}"
    )


def test_pushes_and_privacy_are_read(tmp_path, mlp_pair) -> None:
    extra = "[privacy]\nnoise_multiplier = 2.0\nepsilon_budget = 8\n" + PUSH
    path = write_config(tmp_path, extra)
    write_push_files(tmp_path, mlp_pair)
    config = load_hub_config(path)
    assert config.privacy is not None
    assert config.privacy.epsilon_budget == 8.0
    assert config.pushes[0].devices == ("a", "b")
    assert config.pushes[0].data == tmp_path / "data.npz"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("[rate_limit]\nburst = 0\n", r"rate_limit\.burst = 0 is invalid"),
        ("[rate_limit]\nshare = 1.5\n", r"rate_limit\.share = 1\.5"),
        ('[mqtt]\nprotocol = "3.1.1"\n', r"mqtt\.protocol = '3\.1\.1'"),
        ("[requests]\nbatch_wait_s = -1\n", r"requests\.batch_wait_s = -1\.0"),
        ("[requests]\ncolour = 1\n", r"unknown key requests\.colour"),
        (
            '[mqtt]\ntls_cert_file = "data.npz"\n',
            r"mqtt\.tls_cert_file = '.*data\.npz' is invalid; expected tls_ca_file "
            r"to be set too",
        ),
        (
            '[mqtt]\npassword_file = "data.npz"\n',
            r"mqtt\.password_file = '.*data\.npz' is invalid; expected username "
            r"to be set too",
        ),
        (
            '[mqtt]\ntls_ca_file = "."\n',
            r"mqtt\.tls_ca_file = '\.' is invalid; expected an existing file",
        ),
        ("[privacy]\nnoise_multiplier = 1.0\n", r"missing required key privacy"),
        (
            '[[push]]\nname = "n"\ndevices = ["a/b"]\ndata = "data.npz"\nevery_s = 1\n',
            r"push\[0\]\.devices = 'a/b'",
        ),
        (
            '[[push]]\nname = "n"\ndevices = ["_hub"]\ndata = "data.npz"\n'
            "every_s = 1\n",
            r"push\[0\]\.devices = '_hub' is invalid; expected device ids, each a "
            r"name without .* other than '_hub'",
        ),
        (
            '[[push]]\nname = "n"\ndevices = ["a"]\ndata = "missing.npz"\n'
            "every_s = 1\n",
            r"push\[0\]\.data = 'missing\.npz'",
        ),
        (
            '[[push]]\nname = "n"\ndevices = ["a", "b", "a"]\ndata = "data.npz"\n'
            "every_s = 1\n",
            r"push\[0\]\.devices = \['a', 'b', 'a'\] is invalid; expected each "
            r"device id once, but 'a' repeats",
        ),
        (
            '[mqtt]\nhost = "mqtt://hub.lan"\n',
            r"mqtt\.host = 'mqtt://hub\.lan' is invalid; expected a host name or "
            r"IP address without a scheme, port",
        ),
        (
            '[[push]]\nname = "n"\ndevices = ["a"]\ndata = "data.npz"\n'
            "every_s = 1\nexpiry_s = 4294967296\n",
            r"push\[0\]\.expiry_s = 4294967296 is invalid; expected seconds in "
            r"1\.\.4294967295",
        ),
        (
            "[requests]\nmax_payload_bytes = 268435456\n",
            r"requests\.max_payload_bytes = 268435456 is invalid; expected a byte "
            r"count in 1\.\.268435455, the MQTT maximum",
        ),
    ],
)
def test_invalid_values_name_file_and_key(tmp_path, extra, message) -> None:
    path = write_config(tmp_path, extra)
    with pytest.raises(ConfigError, match=message) as caught:
        load_hub_config(path)
    assert str(path) in str(caught.value)


def test_empty_mqtt_file_keys_mean_unset(tmp_path) -> None:
    extra = '[mqtt]\npassword_file = ""\ntls_ca_file = ""\n'

    config = load_hub_config(write_config(tmp_path, extra))

    assert config.mqtt.password_file is None
    assert config.mqtt.tls_ca_file is None
    assert not config.mqtt.uses_tls


def test_reserved_worker_id_is_named(tmp_path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_hub_config(write_config(tmp_path), worker_id="_hub")

    assert str(caught.value).startswith("worker id '_hub' is invalid")
    assert str(caught.value).endswith(
        "other than '_hub', of at most 32000 bytes of UTF-8"
    )


def test_push_data_of_other_shape_fails_at_start(tmp_path, mlp_pair) -> None:
    path = write_config(tmp_path, PUSH)
    write_push_files(tmp_path, mlp_pair, input_width=32)

    with pytest.raises(ConfigError) as caught:
        load_hub_config(path)
    result = CliRunner().invoke(main, ["hub", "--config", str(path)])

    message = str(caught.value)
    assert message.startswith(f"{path}: [[push]] 'nightly': ")
    assert "x has samples of shape (32,), but the teacher takes (64,)" in message
    assert result.exit_code == 78
    assert result.output == f"error: {message}\n"


def test_push_over_budget_fails_at_start(tmp_path, mlp_pair) -> None:
    # One release of 4 vectors at noise multiplier 2 spends epsilon 4.73.
    extra = "[privacy]\nnoise_multiplier = 2.0\nepsilon_budget = 3\n" + PUSH
    path = write_config(tmp_path, extra)
    write_push_files(tmp_path, mlp_pair)

    result = CliRunner().invoke(main, ["hub", "--config", str(path)])

    assert result.exit_code == 78
    assert result.output == (
        f"error: {path}: [[push]] 'nightly': one batch of 4 samples spends "
        "epsilon 4.73, more than privacy.epsilon_budget 3, so this push could "
        "never send labels; lower its batch_size, or raise "
        "privacy.noise_multiplier or privacy.epsilon_budget\n"
    )


def test_push_within_budget_is_accepted(tmp_path, mlp_pair) -> None:
    extra = "[privacy]\nnoise_multiplier = 2.0\nepsilon_budget = 4.8\n" + PUSH
    path = write_config(tmp_path, extra)
    write_push_files(tmp_path, mlp_pair)

    config = load_hub_config(path)

    assert config.pushes[0].name == "nightly"


def test_private_hard_labels_fail_at_start(tmp_path, mlp_pair) -> None:
    extra = "[privacy]\nnoise_multiplier = 2.0\nepsilon_budget = 8\n" + PUSH
    path = write_config(tmp_path, extra + "hard_labels = true\n")
    write_push_files(tmp_path, mlp_pair)
    np.savez(tmp_path / "data.npz", x=np.zeros((4, 64)), y=np.arange(4))

    result = CliRunner().invoke(main, ["hub", "--config", str(path)])

    assert result.exit_code == 78
    assert result.output == (
        f"error: {path}: [[push]] 'nightly': hard_labels = true is invalid with "
        "a [privacy] table, because the hub would send the y labels of "
        f"{tmp_path / 'data.npz'} without noise and without charging the "
        "privacy budget; remove hard_labels from this [[push]] table, so that "
        "devices get only the noised soft labels\n"
    )
    assert not (tmp_path / "hub-state.sqlite").exists()


def test_hard_labels_need_y_array(tmp_path, mlp_pair) -> None:
    path = write_config(tmp_path, PUSH + "hard_labels = true\n")
    write_push_files(tmp_path, mlp_pair)

    result = CliRunner().invoke(main, ["hub", "--config", str(path)])

    assert result.exit_code == 78
    assert result.output == (
        f"error: {path}: [[push]] 'nightly': hard_labels = true needs a 'y' "
        f"array (one class index per sample) in {tmp_path / 'data.npz'}, which "
        "has none; add y to the file or remove hard_labels from this [[push]] "
        "table\n"
    )


def test_private_push_ignores_data_y(tmp_path, mlp_pair) -> None:
    # Without hard_labels, y is never sent, so its values are not checked.
    extra = "[privacy]\nnoise_multiplier = 2.0\nepsilon_budget = 8\n" + PUSH
    path = write_config(tmp_path, extra)
    write_push_files(tmp_path, mlp_pair)
    np.savez(tmp_path / "data.npz", x=np.zeros((4, 64)), y=np.array([0, 1, 2, 99]))

    config = load_hub_config(path)

    assert config.pushes[0].hard_labels is False


def test_hard_labels_must_be_boolean(tmp_path) -> None:
    path = write_config(tmp_path, PUSH + 'hard_labels = "yes"\n')

    with pytest.raises(ConfigError) as caught:
        load_hub_config(path)

    assert str(caught.value) == (
        f"{path}: push[0].hard_labels = 'yes' is invalid; expected true or false"
    )


@pytest.mark.parametrize(
    ("x", "fragment"),
    [
        (
            np.zeros((0, 64), dtype=np.float32),
            "x has shape (0, 64), so the file has no samples",
        ),
        (
            np.full((4, 64), "0.5"),
            "array 'x' has dtype <U3; expected a numeric dtype",
        ),
    ],
)
def test_push_data_empty_or_text_fails(tmp_path, mlp_pair, x, fragment) -> None:
    path = write_config(tmp_path, PUSH)
    write_push_files(tmp_path, mlp_pair)
    data = tmp_path / "data.npz"
    np.savez(data, x=x)

    result = CliRunner().invoke(main, ["hub", "--config", str(path)])

    assert result.exit_code == 78
    assert result.output.startswith(f"error: {path}: [[push]] 'nightly': {data}: ")
    assert fragment in result.output
    assert len(result.output.splitlines()) == 1
    assert not (tmp_path / "hub-state.sqlite").exists()


def test_corrupt_state_file_is_named_and_kept(tmp_path) -> None:
    path = write_config(tmp_path)
    state_file = tmp_path / "hub-state.sqlite"
    content = b"not a database, " * 16
    state_file.write_bytes(content)

    result = CliRunner().invoke(main, ["hub", "--config", str(path)])

    assert result.exit_code == 78
    assert result.output.startswith(
        f"error: {path}: hub.state_file {state_file} is not a hub state database "
    )
    assert "move it aside" in result.output
    assert result.output.count("\n") == 1
    assert state_file.read_bytes() == content


def test_bundle_output_kind_is_checked(tmp_path) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    manifest_path = bundle / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["teacher"]["output_kind"] = "softmax"
    manifest_path.write_text(json.dumps(manifest))
    path = tmp_path / "hub.toml"
    path.write_text('[teacher]\npath = "bundle"\n')

    result = CliRunner().invoke(main, ["hub", "--config", str(path)])

    assert result.exit_code == 78
    assert result.output.startswith(
        f"error: {path}: cannot load teacher.path {bundle}: {manifest_path}: key "
        'teacher.output_kind is "softmax" (a string); expected "probabilities" '
        'or "logits"; convert the models again'
    )
    assert result.output.count("\n") == 1


def test_keys_dir_file_is_rejected(tmp_path) -> None:
    path = write_config(tmp_path, PUSH)
    path.write_text(
        path.read_text().replace("[hub]\n", '[hub]\nkeys_dir = "a.key"\n', 1)
    )
    (tmp_path / "a.key").write_text("00" * 32)

    with pytest.raises(ConfigError) as caught:
        load_hub_config(path)

    message = str(caught.value)
    assert message.startswith(f"{path}: hub.keys_dir = 'a.key' is invalid; ")
    assert "expected a directory of <device>.key files" in message
    assert message.endswith("set it to the directory that contains the key file")


@pytest.mark.parametrize(
    ("table", "key", "value"),
    [
        ("hub", "worker_id", "w" * 32_001),
        ("hub", "group", "g" * 32_001),
        ("mqtt", "topic_prefix", "p" * 32_001),
        ("push", "devices", ["\u00e9" * 16_001]),
    ],
    ids=["worker_id", "group", "topic_prefix", "device"],
)
def test_topic_level_too_long_is_rejected(tmp_path, table, key, value) -> None:
    path = write_config(tmp_path, PUSH)
    text = path.read_text()
    if table == "push":
        text = text.replace('devices = ["a", "b"]', f"devices = {json.dumps(value)}")
    else:
        text += f"[{table}]\n{key} = {json.dumps(value)}\n"
        text = text.replace('[hub]\nworker_id = "w1"\n', "[hub]\n")
        if table == "hub":
            text = text.replace("[hub]\n", "", 1)
    path.write_text(text)

    with pytest.raises(ConfigError) as caught:
        load_hub_config(path)

    message = str(caught.value)
    assert message.startswith(f"{path}: {'push[0].' if table == 'push' else ''}")
    assert f"{key} = " in message
    assert message.endswith("of at most 32000 bytes of UTF-8")


def test_worker_id_not_utf8_is_rejected(tmp_path) -> None:
    path = write_config(tmp_path)

    with pytest.raises(ConfigError) as caught:
        load_hub_config(path, worker_id="w\udcff")

    assert str(caught.value).startswith("worker id 'w\\udcff' is invalid; expected ")


def test_newer_schema_state_file_is_kept(tmp_path) -> None:
    path = write_config(tmp_path)
    state_file = tmp_path / "hub-state.sqlite"
    with contextlib.closing(sqlite3.connect(state_file)) as database:
        database.executescript(
            "CREATE TABLE push_batches (name TEXT NOT NULL, head TEXT NOT NULL);"
            "PRAGMA user_version = 7;"
        )
    content = state_file.read_bytes()

    result = CliRunner().invoke(main, ["hub", "--config", str(path)])

    assert result.exit_code == 78
    assert result.output.startswith(
        f"error: {path}: hub.state_file {state_file} has schema version 7, "
        "written by a newer dslo-edge; this version reads up to 1. "
    )
    assert "Upgrade dslo-edge on this machine" in result.output
    assert result.output.count("\n") == 1
    assert state_file.read_bytes() == content
    assert sorted(path.name for path in tmp_path.glob("hub-state.sqlite*")) == [
        "hub-state.sqlite"
    ]


def test_other_schema_state_file_is_kept(tmp_path) -> None:
    path = write_config(tmp_path)
    state_file = tmp_path / "hub-state.sqlite"
    with contextlib.closing(sqlite3.connect(state_file)) as database:
        database.execute("CREATE TABLE buckets (device TEXT, level INTEGER)")
    content = state_file.read_bytes()

    result = CliRunner().invoke(main, ["hub", "--config", str(path)])

    assert result.exit_code == 78
    assert result.output.startswith(
        f"error: {path}: hub.state_file {state_file} is not a hub state database "
        "(table buckets lacks the columns tokens, updated); move it aside"
    )
    assert result.output.count("\n") == 1
    assert state_file.read_bytes() == content


def test_other_program_state_file_is_kept(tmp_path) -> None:
    path = write_config(tmp_path)
    state_file = tmp_path / "hub-state.sqlite"
    with contextlib.closing(sqlite3.connect(state_file)) as database:
        database.executescript(
            "CREATE TABLE notes (text TEXT); CREATE TABLE tags (name TEXT);"
            "INSERT INTO notes VALUES ('keep me');"
        )
    content = state_file.read_bytes()

    result = CliRunner().invoke(main, ["hub", "--config", str(path)])

    assert result.exit_code == 78
    assert result.output == (
        f"error: {path}: hub.state_file {state_file} is not a hub state database "
        "(it has the tables notes, tags and none of the hub's, so another "
        "program may use it); set hub.state_file to another path\n"
    )
    assert state_file.read_bytes() == content


def test_state_file_records_schema_version(tmp_path) -> None:
    state_file = tmp_path / "hub-state.sqlite"
    # A file of an earlier version: no user_version, and requests without
    # the charge columns.
    with contextlib.closing(sqlite3.connect(state_file)) as database:
        database.execute(
            "CREATE TABLE requests (device TEXT NOT NULL, request_id BLOB NOT "
            "NULL, worker TEXT NOT NULL, claimed REAL NOT NULL, answered REAL, "
            "status TEXT, payload BLOB, PRIMARY KEY (device, request_id))"
        )

    HubState(state_file, "w1").close()

    with contextlib.closing(sqlite3.connect(state_file)) as database:
        version = database.execute("PRAGMA user_version").fetchone()[0]
        columns = [row[1] for row in database.execute("PRAGMA table_info(requests)")]
    assert version == 1
    assert columns[-2:] == ["charge_multiplier", "charge_count"]


def test_locked_state_file_is_one_line(tmp_path, monkeypatch) -> None:
    path = write_config(tmp_path)
    state_file = tmp_path / "hub-state.sqlite"
    HubState(state_file, "w0").close()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time\n"
            "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "db.execute('BEGIN EXCLUSIVE')\n"
            "print('locked', flush=True)\n"
            "time.sleep(60)\n",
            str(state_file),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    monkeypatch.setattr("dslo_edge.hub_state_file.BUSY_TIMEOUT_S", 0.5)
    try:
        assert holder.stdout.readline() == "locked\n"
        result = CliRunner().invoke(main, ["hub", "--config", str(path)])
    finally:
        holder.kill()
        holder.wait()

    assert result.exit_code == 1, result.output
    assert result.output.startswith(
        f"error: {path}: hub.state_file {state_file} failed while the worker "
        "started (database is locked); another process held a lock on it for "
        f"more than 0.5 s; find it with 'fuser {state_file}'"
    )
    assert result.output.count("\n") == 1


def test_read_only_state_file_is_named(tmp_path, monkeypatch) -> None:
    path = write_config(tmp_path)
    state_file = tmp_path / "hub-state.sqlite"
    with contextlib.closing(sqlite3.connect(state_file)) as database:
        database.execute("CREATE TABLE other (value INTEGER)")
    content = state_file.read_bytes()
    connect = sqlite3.connect

    # SQLite opens a file without write permission in read-only mode, so the
    # switch to WAL fails. Root may write any file, so the test opens the
    # file with a read-only URI in place of changing its permissions.
    def connect_read_only(database, **options):
        return connect(f"file:{database}?mode=ro", uri=True, **options)

    monkeypatch.setattr("dslo_edge.hub_state_file.sqlite3.connect", connect_read_only)

    result = CliRunner().invoke(main, ["hub", "--config", str(path)])

    assert result.exit_code == 78
    assert result.output.startswith(
        f"error: {path}: cannot write hub.state_file {state_file}: "
    )
    assert "attempt to write a readonly database" in result.output
    assert "give this worker's user write access" in result.output
    assert result.output.count("\n") == 1
    assert state_file.read_bytes() == content


@pytest.mark.parametrize("state_file", [".", "data.npz/state.sqlite"])
def test_unopenable_state_file_is_named(tmp_path, state_file: str) -> None:
    path = write_config(tmp_path)
    path.write_text(
        path.read_text().replace("[hub]\n", f'[hub]\nstate_file = "{state_file}"\n', 1)
    )

    result = CliRunner().invoke(main, ["hub", "--config", str(path)])

    assert result.exit_code == 78
    assert result.output.startswith(
        f"error: {path}: cannot open hub.state_file {tmp_path / state_file}: "
    )
    assert "a directory this worker can write to" in result.output
    assert result.output.count("\n") == 1
    assert (tmp_path / "data.npz").read_bytes() == b"npz"


def test_tflite_teacher_needs_output_kind(tmp_path) -> None:
    (tmp_path / "teacher.tflite").write_bytes(b"model")
    path = tmp_path / "hub.toml"
    path.write_text('[teacher]\npath = "teacher.tflite"\n')
    with pytest.raises(ConfigError) as caught:
        load_hub_config(path)

    message = str(caught.value)
    assert message.startswith(f"{path}: missing key teacher.output_kind, ")
    assert "teacher.path teacher.tflite needs because it is a model file" in message
    assert message.endswith("set it to 'probabilities' or 'logits'")


def test_misspelt_teacher_path_is_named(tmp_path) -> None:
    path = tmp_path / "hub.toml"
    path.write_text('[hub]\nworker_id = "w1"\n[teacher]\npaht = "bundle"\n')

    result = CliRunner().invoke(main, ["hub", "--config", str(path)])

    assert result.exit_code == 78
    assert result.output == (
        f"error: {path}: missing required key teacher.path; found teacher.paht, "
        "which may be a misspelling of path\n"
    )


def test_misspelt_teacher_table_is_named(tmp_path) -> None:
    path = tmp_path / "hub.toml"
    path.write_text('[hub]\nworker_id = "w1"\n[teachr]\npath = "bundle"\n')

    result = CliRunner().invoke(main, ["hub", "--config", str(path)])

    assert result.exit_code == 78
    assert result.output == (
        f"error: {path}: missing required key teacher.path; found the unknown "
        "table teachr, which may be a misspelling of teacher\n"
    )


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (
            "[privcy]\nepsilon_budget = 8.0\n",
            "privcy, which may be a misspelling of privacy",
        ),
        (
            "[rate_limt]\nburst = 2\n",
            "rate_limt, which may be a misspelling of rate_limit",
        ),
        ('[[psh]]\nname = "nightly"\n', "psh, which may be a misspelling of push"),
        ("[colour]\nred = 1\n", "colour"),
    ],
)
def test_misspelt_optional_table_is_named(tmp_path, table, expected) -> None:
    path = write_config(tmp_path, table)

    result = CliRunner().invoke(main, ["hub", "--config", str(path)])

    assert result.exit_code == 78
    assert result.output == (
        f"error: {path}: unknown key {expected}; known keys here: hub, mqtt, "
        "privacy, push, rate_limit, requests, teacher\n"
    )


def test_misspelt_push_value_is_named(tmp_path) -> None:
    path = write_config(
        tmp_path,
        '[[push]]\nname = "n"\ndevices = ["d1"]\ndata = "data.npz"\n'
        "every_s = 60\nbatch_sise = 8\n",
    )

    result = CliRunner().invoke(main, ["hub", "--config", str(path)])

    assert result.exit_code == 78
    assert result.output == (
        f"error: {path}: unknown key push[0].batch_sise, which may be a "
        "misspelling of push[0].batch_size; known keys here: batch_size, data, "
        "devices, every_s, expiry_s, hard_labels, name\n"
    )


def test_value_like_table_name_has_no_hint(tmp_path) -> None:
    # privcy = 1 is a value, not a table header, so it gets no hint.
    path = write_config(tmp_path)
    path.write_text("privcy = 1\n" + path.read_text())

    result = CliRunner().invoke(main, ["hub", "--config", str(path)])

    assert result.exit_code == 78
    assert result.output == (
        f"error: {path}: unknown key privcy; known keys here: hub, mqtt, privacy, "
        "push, rate_limit, requests, teacher\n"
    )


def test_missing_every_s_names_no_valid_key(tmp_path) -> None:
    extra = PUSH.replace("every_s = 3600", "expiry_s = 600")
    path = write_config(tmp_path, extra)

    result = CliRunner().invoke(main, ["hub", "--config", str(path)])

    assert result.exit_code == 78
    assert result.output == (f"error: {path}: missing required key push[0].every_s\n")


def test_misspelt_every_s_is_named(tmp_path) -> None:
    extra = PUSH.replace("every_s = 3600", "evry_s = 3600\nexpiry_s = 600")
    path = write_config(tmp_path, extra)

    result = CliRunner().invoke(main, ["hub", "--config", str(path)])

    assert result.exit_code == 78
    assert result.output == (
        f"error: {path}: missing required key push[0].every_s; found "
        "push[0].evry_s, which may be a misspelling of every_s\n"
    )


def test_unloadable_teacher_file_exits_78(tmp_path) -> None:
    path = write_config(tmp_path)

    result = CliRunner().invoke(main, ["hub", "--config", str(path)])

    assert result.exit_code == 78
    assert result.output.startswith(
        f"error: {path}: cannot load teacher.path {tmp_path / 'teacher.tflite'}: "
    )
    assert "the interpreter cannot load the model" in result.output
    assert "expected a .tflite model file or a bundle directory" in result.output
    assert result.output.count("\n") == 1


def test_empty_teacher_file_is_named(tmp_path) -> None:
    path = write_config(tmp_path)
    (tmp_path / "teacher.tflite").write_bytes(b"")

    result = CliRunner().invoke(main, ["hub", "--config", str(path)])

    assert result.exit_code == 78
    assert result.output == (
        f"error: {path}: cannot load teacher.path {tmp_path / 'teacher.tflite'}: "
        "the model file is empty (0 bytes); point teacher.path at a .tflite file "
        "that 'dslo-edge convert' wrote, or convert the teacher again\n"
    )


def test_corrupt_teacher_bundle_exits_78(tmp_path, mlp_pair) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(mlp_pair.bundle, bundle)
    with open(bundle / "teacher.tflite", "ab") as teacher:
        teacher.write(b"x")
    path = tmp_path / "hub.toml"
    path.write_text('[hub]\nworker_id = "w1"\n[teacher]\npath = "bundle"\n')

    result = CliRunner().invoke(main, ["hub", "--config", str(path)])

    assert result.exit_code == 78
    assert result.output.startswith(
        f"error: {path}: cannot load teacher.path {bundle}: "
    )
    assert "checksum mismatch for" in result.output
    assert "expected a .tflite model file" not in result.output


def key(request: int, device: str = "cam", samples: int = 4) -> RequestKey:
    return RequestKey(device, request.to_bytes(16, "little"), samples)


RATE = RateLimit(requests_per_s=1.0, burst=2)


def test_state_file_directory_creation_logged(tmp_path, caplog) -> None:
    path = tmp_path / "new" / "dir" / "state.sqlite"

    with caplog.at_level(logging.INFO, logger="dslo_edge.hub_state"):
        HubState(path, "w1")
        HubState(path, "w2")

    assert path.is_file()
    created = [r for r in caplog.records if "Created the director" in r.message]
    assert len(created) == 1
    # Both missing levels are named, so a mistyped path can be removed whole.
    assert str(tmp_path / "new") + "," in created[0].message
    assert str(tmp_path / "new" / "dir") in created[0].message


def test_rate_limit_is_a_token_bucket(tmp_path) -> None:
    state = HubState(tmp_path / "state.sqlite", "w1")
    kinds = [a.kind for a in state.admit([key(1), key(2), key(3)], 0.0, RATE, None, 30)]
    assert kinds == [ADMITTED, ADMITTED, RATE_LIMITED]
    refused = state.admit([key(4)], 0.5, RATE, None, 30)[0]
    assert refused.kind == RATE_LIMITED
    assert refused.retry_after_s == pytest.approx(0.5)
    assert state.admit([key(5)], 1.0, RATE, None, 30)[0].kind == ADMITTED
    other = state.admit([key(6, device="door")], 1.0, RATE, None, 30)[0]
    assert other.kind == ADMITTED


def test_stored_rate_limit_recomputes_retry(tmp_path) -> None:
    state = HubState(tmp_path / "state.sqlite", "w1")
    state.admit([key(1), key(2)], 0.0, RATE, None, 30)
    refused = state.admit([key(3)], 0.0, RATE, None, 30)[0]
    state.record_answers([(key(3), "rate_limited", b"too often")], 0.0)

    replayed = state.admit([key(3)], 0.25, RATE, None, 30)[0]
    late = state.admit([key(3)], 2.0, RATE, None, 30)[0]

    assert refused.retry_after_s == pytest.approx(1.0)
    assert replayed.kind == CACHED
    assert replayed.status == "rate_limited"
    assert replayed.payload == b"too often"
    assert replayed.retry_after_s == pytest.approx(0.75)
    # A token is due by now, so the device may send its next request at once.
    assert late.kind == CACHED
    assert late.retry_after_s == 0.0


def test_two_workers_share_one_bucket(tmp_path) -> None:
    first = HubState(tmp_path / "state.sqlite", "w1")
    second = HubState(tmp_path / "state.sqlite", "w2")
    assert first.admit([key(1)], 0.0, RATE, None, 30)[0].kind == ADMITTED
    assert second.admit([key(2)], 0.0, RATE, None, 30)[0].kind == ADMITTED
    assert first.admit([key(3)], 0.0, RATE, None, 30)[0].kind == RATE_LIMITED


def test_repeated_request_is_answered_from_the_store(tmp_path) -> None:
    first = HubState(tmp_path / "state.sqlite", "w1")
    second = HubState(tmp_path / "state.sqlite", "w2")
    assert first.admit([key(1)], 0.0, RATE, None, 30)[0].kind == ADMITTED
    assert second.admit([key(1)], 1.0, RATE, None, 30)[0].kind == IN_PROGRESS
    # A claim older than the timeout belongs to a worker that died.
    assert second.admit([key(1)], 40.0, RATE, None, 30)[0].kind == ADMITTED
    second.record_answers([(key(1), "ok", b"labels")], 41.0)
    cached = first.admit([key(1)], 42.0, RATE, None, 30)[0]
    assert cached.kind == CACHED
    assert cached.payload == b"labels"
    assert first.answer_counts() == {"ok": 1}
    assert first.forget_answers(before=50.0) == 1


def test_privacy_budget_stops_admission(tmp_path) -> None:
    pytest.importorskip("dp_accounting")
    from dslo_edge.privacy import PrivacySettings

    privacy = PrivacySettings(noise_multiplier=10.0, epsilon_budget=2.0)
    state = HubState(tmp_path / "state.sqlite", "w1")
    rate = RateLimit(requests_per_s=1000.0, burst=1000)
    kinds = [
        state.admit([key(i, samples=10)], 0.0, rate, privacy, 30)[0].kind
        for i in range(40)
    ]
    admitted = kinds.count(ADMITTED)
    assert 0 < admitted < 40
    assert kinds[admitted:] == [BUDGET_EXHAUSTED] * (40 - admitted)
    assert state.releases("cam") == {10.0: 10 * admitted}
    assert state.epsilon("cam", privacy) <= 2.0


def taken_over_request(tmp_path):
    """Return privacy settings and two workers that both admitted request 1.

    Worker w1 admits it first, and w2 takes the claim over after 40 s.
    """
    pytest.importorskip("dp_accounting")
    from dslo_edge.privacy import PrivacySettings

    privacy = PrivacySettings(noise_multiplier=10.0, epsilon_budget=50.0)
    first = HubState(tmp_path / "state.sqlite", "w1")
    second = HubState(tmp_path / "state.sqlite", "w2")
    assert first.admit([key(1)], 0.0, RATE, privacy, 30)[0].kind == ADMITTED
    assert second.admit([key(1)], 40.0, RATE, privacy, 30)[0].kind == ADMITTED
    return privacy, first, second


def test_refund_after_claim_takeover(tmp_path) -> None:
    # w1 is slow, so w2 takes the claim over and labels the request too.
    privacy, first, second = taken_over_request(tmp_path)
    assert first.releases("cam") == {10.0: 4}

    # w2's labels come out NaN: it refunds the one charge.
    second.record_answers(
        [(key(1), "rejected", b"nan")], 41.0, refunds=[key(1)], privacy=privacy
    )
    after_refund = first.releases("cam")
    # w1 then releases its labels, which must be paid for.
    first.record_answers(
        [(key(1), "ok", b"labels")], 42.0, released=[key(1)], privacy=privacy
    )

    assert after_refund == {10.0: 0}
    assert first.releases("cam") == {10.0: 4}


def test_stale_worker_does_not_refund(tmp_path) -> None:
    privacy, first, second = taken_over_request(tmp_path)

    # w1 lost its claim, so its NaN labels refund nothing.
    first.record_answers(
        [(key(1), "rejected", b"nan")], 41.0, refunds=[key(1)], privacy=privacy
    )
    after_rejection = first.releases("cam")
    # w2 holds the claim and releases its labels, paid by the admission.
    second.record_answers(
        [(key(1), "ok", b"labels")], 42.0, released=[key(1)], privacy=privacy
    )

    assert after_rejection == {10.0: 4}
    assert first.releases("cam") == {10.0: 4}


def test_both_workers_release_twice_charged(tmp_path) -> None:
    privacy, first, second = taken_over_request(tmp_path)

    second.record_answers(
        [(key(1), "ok", b"a")], 41.0, released=[key(1)], privacy=privacy
    )
    first.record_answers(
        [(key(1), "ok", b"b")], 42.0, released=[key(1)], privacy=privacy
    )

    # Two releases with fresh noise each for the same four samples.
    assert first.releases("cam") == {10.0: 8}


def test_teacher_rounds_are_shared(tmp_path) -> None:
    first = HubState(tmp_path / "state.sqlite", "w1")
    second = HubState(tmp_path / "state.sqlite", "w2")
    assert first.teacher_round("sha-a", "a") == 1
    assert second.teacher_round("sha-a", "a") == 1
    assert second.teacher_round("sha-b", "b") == 2
    assert first.teacher_round("sha-b", "b") == 2


def test_push_run_is_claimed_once_per_period(tmp_path) -> None:
    first = HubState(tmp_path / "state.sqlite", "w1")
    second = HubState(tmp_path / "state.sqlite", "w2")
    assert first.claim_run("nightly", 0.0, 60.0)
    assert not second.claim_run("nightly", 30.0, 60.0)
    assert second.claim_run("nightly", 60.0, 60.0)


def test_shortened_push_period_moves_next_run(tmp_path, caplog) -> None:
    state = HubState(tmp_path / "state.sqlite", "w1")
    caplog.set_level("INFO", logger="dslo_edge.hub_state")
    assert state.claim_run("nightly", 0.0, 86400.0)
    # Restarted with every_s = 60: the run due at 86400 moves to 100 + 60.
    assert not state.claim_run("nightly", 100.0, 60.0)
    assert not state.claim_run("nightly", 159.0, 60.0)
    assert state.claim_run("nightly", 160.0, 60.0)
    assert not state.claim_run("nightly", 200.0, 60.0)
    assert state.claim_run("nightly", 220.0, 60.0)
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "Push nightly was due in 86300 s, more than its every_s 60; its next "
        "run is in 60 s"
    ]
    state.close()


def test_hub_unit_runs_one_worker_per_instance() -> None:
    unit = render_hub_unit()
    assert "ExecStart=/opt/dslo-edge/venv/bin/dslo-edge hub --config" in unit
    assert "--worker-id %i" in unit
    assert "Type=notify" in unit
    assert "WatchdogSec=60" in unit.splitlines()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit
    assert "RestartPreventExitStatus=78" in unit
    assert "ReadWritePaths=/var/lib/dslo-edge-hub" in unit


def test_hub_print_unit_starts_this_script() -> None:
    script = Path(sys.executable).parent / "dslo-edge"
    if not script.is_file():
        pytest.skip(f"no dslo-edge script beside {sys.executable}")

    result = subprocess.run(
        [str(script), "hub", "--print-unit"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )

    assert (
        f"ExecStart={script} hub --config /etc/dslo-edge/hub.toml --worker-id %i"
        in result.stdout.splitlines()
    )


def test_hub_print_unit_takes_exec() -> None:
    result = CliRunner().invoke(
        main, ["hub", "--print-unit", "--exec", "/opt/hub/bin/dslo-edge"]
    )

    assert result.exit_code == 0
    assert (
        "ExecStart=/opt/hub/bin/dslo-edge hub --config /etc/dslo-edge/hub.toml "
        "--worker-id %i" in result.output.splitlines()
    )
    assert "ProtectHome=yes" in result.output.splitlines()
    assert "WatchdogSec=60" in result.output.splitlines()


def test_hub_print_unit_takes_config() -> None:
    arguments = ["hub", "--print-unit", "--exec", "/opt/hub/bin/dslo-edge"]
    result = CliRunner().invoke(main, [*arguments, "--config", "/srv/hub/hub.toml"])

    assert result.exit_code == 0
    assert (
        "ExecStart=/opt/hub/bin/dslo-edge hub --config /srv/hub/hub.toml "
        "--worker-id %i" in result.output.splitlines()
    )


def test_hub_print_unit_names_config_option() -> None:
    arguments = ["hub", "--print-unit", "--exec", "/opt/hub/bin/dslo-edge"]
    result = CliRunner().invoke(main, [*arguments, "--config", "hub.toml"])

    assert result.exit_code == 78
    assert "error: --config 'hub.toml' is not an absolute path" in result.output


def test_hub_print_unit_takes_user() -> None:
    arguments = ["hub", "--print-unit", "--exec", "/opt/hub/bin/dslo-edge"]
    result = CliRunner().invoke(main, [*arguments, "--user", "dslo"])

    lines = result.output.splitlines()
    assert result.exit_code == 0
    assert "User=dslo" in lines
    assert "StateDirectory=dslo-edge-hub" in lines
    assert "# the owner of it and of its content." in lines


@pytest.mark.parametrize(
    ("arguments", "status", "expected"),
    [
        (
            ["--print-unit", "--user", "bad;name"],
            78,
            "error: --user 'bad;name' is not a valid user name",
        ),
        (
            ["--config", "hub.toml", "--user", "dslo"],
            2,
            "--user is used only with --print-unit",
        ),
    ],
    ids=["invalid-name", "without-print-unit"],
)
def test_hub_user_rejected(arguments, status, expected) -> None:
    result = CliRunner().invoke(main, ["hub", *arguments])

    assert result.exit_code == status
    assert expected in result.output


def test_hub_print_unit_rejects_worker_id() -> None:
    result = CliRunner().invoke(main, ["hub", "--print-unit", "--worker-id", "3"])

    assert result.exit_code == 2
    assert "--worker-id is not used with --print-unit" in result.output


def test_hub_exec_needs_print_unit(tmp_path) -> None:
    result = CliRunner().invoke(
        main, ["hub", "--config", str(tmp_path / "hub.toml"), "--exec", "/a"]
    )

    assert result.exit_code == 2
    assert "--exec is used only with --print-unit" in result.output


def test_device_unit_still_runs_daemon() -> None:
    unit = render_unit()
    assert "ExecStart=/opt/dslo-edge/venv/bin/dslo-edge run --config" in unit
    assert "hub" not in unit


@pytest.mark.parametrize(
    ("output_kind", "error"), [("logits", True), ("probabilities", False)]
)
def test_bundle_output_kind_must_match(
    tmp_path, mlp_pair, output_kind: str, error: bool
) -> None:
    extra = {"teacher": f'output_kind = "{output_kind}"'}
    config = write_hub_config(tmp_path / "hub", 1883, mlp_pair.bundle, extra)

    if not error:
        assert load_hub_config(config, "w1").teacher.output_kind == output_kind
        return
    with pytest.raises(ConfigError) as caught:
        load_hub_config(config, "w1")

    assert str(caught.value) == (
        f"{config}: teacher.output_kind = 'logits' is invalid for the bundle "
        f"{mlp_pair.bundle}, whose manifest says its teacher outputs "
        "'probabilities'; remove teacher.output_kind, which only a .tflite "
        "teacher file needs"
    )


def test_multi_head_teacher_needs_requests_off(two_head_bundle, tmp_path) -> None:
    config = write_hub_config(tmp_path / "hub", 1883, two_head_bundle)

    with pytest.raises(ConfigError) as caught:
        load_hub_config(config, "w1")

    message = str(caught.value)
    assert "is a bundle whose student has several heads (digit, shape)" in message
    assert "serves label requests with single-head labels only" in message
    assert "set enabled = false in the [requests] table" in message


def test_multi_head_teacher_without_requests_loads(two_head_bundle, tmp_path) -> None:
    extra = {"requests": "enabled = false"}
    config = write_hub_config(tmp_path / "hub", 1883, two_head_bundle, extra)

    loaded = load_hub_config(config, "w1")

    assert loaded.requests.enabled is False
    assert loaded.pushes == ()


HUB_DOC = Path(__file__).resolve().parent.parent / "docs" / "hub.md"


def test_hub_reference_example_loads(tmp_path, mlp_pair) -> None:
    text = re.search(r"```toml\n(.*?)```", HUB_DOC.read_text(), re.S).group(1)
    shutil.copytree(mlp_pair.bundle, tmp_path / "bundle")
    x = np.random.default_rng(0).normal(size=(40, 64)).astype(np.float32)
    np.savez(tmp_path / "nightly.npz", x=x)
    (tmp_path / "keys").mkdir()
    (tmp_path / "hub.toml").write_text(text)

    config = load_hub_config(tmp_path / "hub.toml")

    assert config.privacy is not None
    assert config.privacy.epsilon_budget == 8.0
    assert config.pushes[0].name == "nightly"
    assert config.pushes[0].batch_size == 32


def test_hub_doc_epsilon_table_matches_accountant() -> None:
    pytest.importorskip("dp_accounting")
    from dslo_edge.privacy import epsilon_spent

    table = re.search(
        r"\| `noise_multiplier` \| 1 sample \| (.*?) \|\n\|[-| ]+\|\n((?:\|.*\|\n)+)",
        HUB_DOC.read_text(),
    )
    counts = [1] + [int(count) for count in table.group(1).split(" | ")]
    rows = [line.strip("|").split("|") for line in table.group(2).splitlines()]

    assert len(rows) == 4
    for row in rows:
        multiplier = float(row[0])
        for count, documented in zip(counts, row[1:], strict=True):
            spent = epsilon_spent({multiplier: count}, 1e-5, "rdp")
            assert documented.strip() == f"{spent:.3g}", (multiplier, count)
