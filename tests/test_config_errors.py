"""Device config mistakes that must give one clear line each."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dslo_edge.config import load_config, render_config
from dslo_edge.daemon import EdgeDaemon
from dslo_edge.errors import ConfigError
from tests.bundle_files import write_bundle
from tests.cli_process import run_cli


def write(tmp_path: Path, bundle: Path, overrides: dict | None = None) -> Path:
    path = tmp_path / "device.toml"
    text = render_config("dev-a", bundle, tmp_path / "state", 9, overrides=overrides)
    path.write_text(text)
    return path


def config_error(tmp_path: Path, overrides: dict) -> tuple[Path, str]:
    """Write a config with ``overrides`` and return its path and load error."""
    path = write(tmp_path, tmp_path / "bundle", overrides)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return path, str(caught.value)


def test_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, tmp_path / "bundle")
    plain = load_config(path)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())

    marked = load_config(path)

    assert marked.device_id == plain.device_id
    assert marked.bundle == plain.bundle


@pytest.mark.parametrize(
    ("extra", "fix"),
    [
        ("port = 1884\n", "a key is given twice there, so keep only one of them"),
        (
            "[mqtt]\nkeepalive = 30\n",
            "a table is given twice, so merge its keys into one table",
        ),
        ("port = \n", "correct the TOML syntax at that line"),
    ],
)
def test_toml_syntax_error_names_fix(tmp_path: Path, extra: str, fix: str) -> None:
    path = write(tmp_path, tmp_path / "bundle")
    text = path.read_text()
    # The extra lines go at the end of the [mqtt] table, whose port the first
    # case repeats.
    path.write_text(text.replace("[training]\n", extra + "\n[training]\n"))

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    message = str(caught.value)
    assert message.startswith(f"cannot read {path}: ")
    assert "(at line " in message
    assert message.endswith(f"; {fix}")


def test_missing_config_names_fix(tmp_path: Path) -> None:
    path = tmp_path / "device.toml"

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert str(caught.value) == (
        f"config file not found: {path}; check the path, because a relative "
        "path is read from the current directory"
    )


def test_non_utf8_config_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, tmp_path / "bundle")
    path.write_bytes(path.read_bytes().replace(b'"dev-a"', b'"dev-\xe9"'))

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert "is not UTF-8 text" in str(caught.value)
    assert "save the file as UTF-8" in str(caught.value)


def test_misspelt_required_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "device.toml"
    path.write_text('[device]\nidd = "porch"\nbundle = "bundle"\n')

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert str(caught.value) == (
        f"{path}: missing required key device.id; found device.idd, which may "
        "be a misspelling of id"
    )


def test_misspelt_required_table_is_named(tmp_path: Path) -> None:
    path = tmp_path / "device.toml"
    path.write_text('[devise]\nid = "porch"\nbundle = "bundle"\n')

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert str(caught.value) == (
        f"{path}: missing required key device.id; found the unknown table "
        "devise, which may be a misspelling of device"
    )


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (
            "[smoothng]\nlambda = 0.5\n",
            "smoothng, which may be a misspelling of smoothing",
        ),
        (
            '[securty]\nhmac_key_file = "key"\n',
            "securty, which may be a misspelling of security",
        ),
        ("[colour]\nred = 1\n", "colour"),
    ],
)
def test_misspelt_optional_table_is_named(
    tmp_path: Path, table: str, expected: str
) -> None:
    path = write(tmp_path, tmp_path / "bundle")
    path.write_text(path.read_text() + "\n" + table)

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert str(caught.value) == (
        f"{path}: unknown key {expected}; known keys here: alpha, budget, device, "
        "health, homeassistant, limits, logging, monitor, mqtt, requests, "
        "security, smoothing, training"
    )


@pytest.mark.parametrize(
    ("known", "misspelt"),
    [
        ("learning_rate = 0.05", "learning_rat = 0.05"),
        ("checkpoint_every = 20", "checkpoint_evry = 20"),
    ],
)
def test_misspelt_value_key_is_named(tmp_path: Path, known: str, misspelt: str) -> None:
    path = write(tmp_path, tmp_path / "bundle")
    text = path.read_text()
    assert known in text
    path.write_text(text.replace(known, misspelt))
    wrong, right = misspelt.split(" = ")[0], known.split(" = ")[0]

    result = run_cli("run", "--config", str(path))

    assert result.returncode == 78
    assert result.stdout == ""
    assert result.stderr.startswith(
        f"error: {path}: unknown key training.{wrong}, which may be a "
        f"misspelling of training.{right}; known keys here: "
    )
    assert result.stderr.count("\n") == 1


def test_similar_top_level_key_has_no_hint(tmp_path: Path) -> None:
    # A top-level key devise is no table header, so it is not named.
    path = tmp_path / "device.toml"
    path.write_text('devise = "porch"\n')

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert str(caught.value) == f"{path}: missing required key device.id"


def test_missing_required_key_has_no_hint(tmp_path: Path) -> None:
    path = tmp_path / "device.toml"
    path.write_text('[device]\nbundle = "bundle"\nstate_dir = "state"\n')

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert str(caught.value) == f"{path}: missing required key device.id"


@pytest.mark.parametrize(
    ("table", "key", "expected"),
    [
        ("training", "max_age_s", "a finite positive number of seconds"),
        ("training", "max_clock_skew_s", "a finite positive number of seconds"),
        ("limits", "max_abs_input", "a finite positive magnitude"),
        ("device", "battery_wh", "finite watt-hours >= 0"),
        ("budget", "energy_budget_j_per_hour", "finite positive joules"),
    ],
)
def test_infinite_float_expects_finite(
    tmp_path: Path, table: str, key: str, expected: str
) -> None:
    path, message = config_error(tmp_path, {table: {key: math.inf}})

    assert message == f"{path}: {table}.{key} = inf is invalid; expected {expected}"


def test_unknown_runtime_is_rejected(tmp_path: Path) -> None:
    path, message = config_error(tmp_path, {"device": {"runtime": "tflite"}})

    assert f"{path}: device.runtime = 'tflite' is invalid" in message
    assert "auto, ai-edge-litert or tflite-runtime" in message


def test_budget_error_names_file_once(tmp_path: Path) -> None:
    path = write(
        tmp_path, tmp_path / "bundle", {"budget": {"battery_min_percent": 150.0}}
    )

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    message = str(caught.value)
    assert message.count(str(path)) == 1
    assert "battery_min_percent = 150.0 is invalid" in message


def test_budget_resume_default_below_new_minimum(tmp_path: Path) -> None:
    path, message = config_error(tmp_path, {"budget": {"battery_min_percent": 30.0}})

    assert message == (
        f"{path}: [budget] battery_resume_percent = 25.0 (the default) is "
        "invalid; expected 30.0..100, at least battery_min_percent; set "
        "battery_resume_percent in [budget] too"
    )


def test_unknown_profile_names_key(mlp_pair, tmp_path: Path) -> None:
    path = write(tmp_path, mlp_pair.bundle, {"device": {"profile": "no-such-board"}})

    with pytest.raises(ConfigError) as caught:
        EdgeDaemon(load_config(path))

    message = str(caught.value)
    assert f"{path}: device.profile = 'no-such-board'" in message
    assert "known profiles: " in message
    assert not (tmp_path / "state").exists()


def test_bundle_that_is_a_file_is_named(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.tflite"
    bundle.write_bytes(b"not a bundle folder")
    path = write(tmp_path, bundle)

    result = run_cli("run", "--config", str(path))

    assert result.returncode == 78
    assert f"device.bundle {bundle} is a file" in result.stderr


def _break_manifest_json(bundle: Path) -> str:
    (bundle / "manifest.json").write_text('{"format_version": 1,')
    return (
        f"{bundle / 'manifest.json'} is not valid JSON (Expecting property name "
        "enclosed in double quotes: line 1 column 22 (char 21)); the copy is "
        "damaged or incomplete, so copy the whole bundle directory again, or "
        "write it again with 'dslo-edge convert'"
    )


def _make_manifest_binary(bundle: Path) -> str:
    (bundle / "manifest.json").write_bytes(b"\xff\xfe{")
    return (
        f"{bundle / 'manifest.json'} is not valid JSON ('utf-8' codec can't "
        "decode byte 0xff in position 0: invalid start byte); the copy is "
        "damaged or incomplete, so copy the whole bundle directory again"
    )


def _break_student_checksum(bundle: Path) -> str:
    (bundle / "student.tflite").write_bytes(b"truncated copy")
    return f"checksum mismatch for {bundle / 'student.tflite'}: manifest has "


def _remove_student_file(bundle: Path) -> str:
    (bundle / "student.tflite").unlink()
    return (
        f"bundle file {bundle / 'student.tflite'} is missing, but manifest.json "
        "names it as the student model; copy the whole bundle directory again"
    )


def _make_student_a_directory(bundle: Path) -> str:
    (bundle / "student.tflite").unlink()
    (bundle / "student.tflite").mkdir()
    return (
        f"bundle file {bundle / 'student.tflite'} is not a regular file, but "
        "manifest.json names it as the student model; copy the whole bundle "
        "directory again"
    )


def _empty_student_file(bundle: Path) -> str:
    (bundle / "student.tflite").write_bytes(b"")
    return (
        f"bundle file {bundle / 'student.tflite'} is empty (0 bytes), but "
        "manifest.json names it as the student model; copy the whole bundle "
        "directory again, or write it again with 'dslo-edge convert'\n"
    )


def _make_manifest_an_array(bundle: Path) -> str:
    (bundle / "manifest.json").write_text("[1, 2]")
    return f"{bundle / 'manifest.json'} contains [1, 2] (an array); expected"


@pytest.mark.parametrize(
    "corrupt",
    [
        _break_manifest_json,
        _make_manifest_binary,
        _break_student_checksum,
        _remove_student_file,
        _make_student_a_directory,
        _empty_student_file,
        _make_manifest_an_array,
    ],
)
def test_corrupt_bundle_exits_78(tmp_path: Path, corrupt) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    fragment = corrupt(bundle)
    path = write(tmp_path, bundle)

    result = run_cli("run", "--config", str(path))

    assert result.returncode == 78
    assert result.stderr.startswith(f"error: {fragment}")
    assert len(result.stderr.splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [".lock"]


def test_sighup_stops_daemon_cleanly(mlp_pair, tmp_path: Path) -> None:
    path = write(tmp_path, mlp_pair.bundle)
    process = subprocess.Popen(
        [sys.executable, "-m", "dslo_edge.cli", "run", "--config", str(path)],
        stderr=subprocess.PIPE,
        text=True,
    )
    # run() installs its signal handlers before start() logs this line.
    assert process.stderr is not None
    seen = []
    for line in process.stderr:
        seen.append(line)
        if "Starting device dev-a" in line:
            break
    assert seen and "Starting device dev-a" in seen[-1], "".join(seen)

    process.send_signal(signal.SIGHUP)
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 0
    assert "received signal 1, stopping" in stderr


def test_unknown_task_head_names_file(two_head_bundle, tmp_path: Path) -> None:
    overrides = {"training.tasks.colour": {"weight": 0.5}}
    path = write(tmp_path, two_head_bundle, overrides)

    with pytest.raises(ConfigError) as caught:
        EdgeDaemon(load_config(path))

    message = str(caught.value)
    assert message.startswith(f"{path}: [training.tasks.colour] names head")


def test_queue_size_of_one_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, tmp_path / "bundle", {"training": {"queue_size": 1}})

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert "queue_size" in str(caught.value)
    assert "2..100000" in str(caught.value)


@pytest.mark.parametrize("value", [0, -1, 1.5, "32MiB"])
def test_max_queued_bytes_must_be_positive(tmp_path: Path, value) -> None:
    overrides = {"training": {"max_queued_bytes": value}}

    path, message = config_error(tmp_path, overrides)

    assert message.startswith(f"{path}: training.max_queued_bytes = ")
    if isinstance(value, int):
        assert message.endswith("expected a positive byte count")
    else:
        assert message.endswith("expected an integer (a positive byte count)")


def test_applied_id_capacity_below_queue_is_rejected(tmp_path: Path) -> None:
    overrides = {
        "training": {"queue_size": 4000, "applied_id_capacity": 7999},
    }

    path, message = config_error(tmp_path, overrides)

    assert message == (
        f"{path}: training.applied_id_capacity = 7999 is invalid; expected at "
        "least twice queue_size (4000), because a restart receives again the "
        "updates applied but not yet acknowledged, and only ids still in the "
        "record are skipped; raise applied_id_capacity or lower queue_size"
    )


def test_applied_id_capacity_of_twice_queue_is_accepted(tmp_path: Path) -> None:
    overrides = {
        "training": {"queue_size": 4000, "applied_id_capacity": 8000},
    }

    config = load_config(write(tmp_path, tmp_path / "bundle", overrides))

    assert config.training.applied_id_capacity == 8000


@pytest.mark.parametrize(
    ("capacity", "queue_size"), [(1000, 500), (2047, 1023), (2048, 1024)]
)
def test_default_queue_size_follows_small_capacity(
    tmp_path: Path, capacity: int, queue_size: int
) -> None:
    path = write(
        tmp_path, tmp_path / "bundle", {"training": {"applied_id_capacity": capacity}}
    )
    lines = path.read_text().splitlines()
    path.write_text(
        "\n".join(line for line in lines if not line.startswith("queue_size ="))
    )

    config = load_config(path)

    assert config.training.queue_size == queue_size
    assert config.training.applied_id_capacity == capacity


@pytest.mark.parametrize("prefix", ["home/+/x", "homeassistant/#"])
def test_homeassistant_prefix_with_wildcard_rejected(
    tmp_path: Path, prefix: str
) -> None:
    path, message = config_error(tmp_path, {"homeassistant": {"prefix": prefix}})

    assert f"{path}: homeassistant.prefix = {prefix!r} is invalid" in message
    assert "without '+', '#' or NUL" in message


def test_homeassistant_prefix_may_have_levels(tmp_path: Path) -> None:
    path = write(
        tmp_path, tmp_path / "bundle", {"homeassistant": {"prefix": "site-1/ha"}}
    )

    assert load_config(path).homeassistant.prefix == "site-1/ha"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"smoothing": {"capacity": 10**17}}, "smoothing.capacity"),
        (
            {"training.tasks.shape": {"smoothing_capacity": 10**17}},
            "training.tasks.shape.smoothing_capacity",
        ),
    ],
)
def test_huge_smoothing_capacity_is_rejected(
    tmp_path: Path, overrides: dict, key: str
) -> None:
    _, message = config_error(tmp_path, overrides)

    assert f"{key} = {10**17} is invalid" in message
    assert "a count of sample ids in 1..10000000" in message


def test_negative_probe_every_is_rejected(tmp_path: Path) -> None:
    path, message = config_error(tmp_path, {"health": {"probe_every": -1}})

    assert f"{path}: health.probe_every = -1 is invalid" in message
    assert "0 checks only before checkpoints" in message


def test_reserved_hub_device_id_is_rejected(tmp_path: Path) -> None:
    path, message = config_error(tmp_path, {"device": {"id": "_hub"}})

    assert f"{path}: device.id = '_hub' is invalid" in message
    assert "a device id other than '_hub'" in message


@pytest.mark.parametrize(
    ("section", "key", "value", "example"),
    [
        ("device", "id", "x/y", "kitchen-cam"),
        ("device", "id", "", "kitchen-cam"),
        ("mqtt", "topic_prefix", "a b", "dslo"),
        ("mqtt", "topic_prefix", "dslo/home", "dslo"),
    ],
)
def test_topic_level_error_names_key(
    tmp_path: Path, section: str, key: str, value: str, example: str
) -> None:
    path, message = config_error(tmp_path, {section: {key: value}})

    assert message == (
        f"{path}: {section}.{key} = {value!r} is invalid; expected a non-empty "
        "name without '/', '+', '#', whitespace or NUL, for example "
        f"{example!r}"
    )


def test_odd_hex_key_names_config_key(tmp_path: Path) -> None:
    key_file = tmp_path / "device.key"
    key_file.write_text("a" * 63 + "\n")
    bundle = write_bundle(tmp_path / "bundle")
    path = write(tmp_path, bundle, {"security": {"hmac_key_file": "device.key"}})

    result = run_cli("run", "--config", str(path))

    assert result.returncode == 78, result.stderr
    assert result.stderr.startswith(
        f"error: {path}: security.hmac_key_file = {str(key_file)!r}: "
        f"HMAC key file {key_file} contains hex text that does not decode "
        "(63 hex digits; expected an even number"
    )
    assert len(result.stderr.splitlines()) == 1


def test_damaged_hex_key_names_config_key(tmp_path: Path) -> None:
    key_file = tmp_path / "device.key"
    key_file.write_text("g" + "a" * 63 + "\n")
    bundle = write_bundle(tmp_path / "bundle")
    path = write(tmp_path, bundle, {"security": {"hmac_key_file": "device.key"}})

    result = run_cli("run", "--config", str(path))

    assert result.returncode == 78, result.stderr
    assert result.stderr.startswith(
        f"error: {path}: security.hmac_key_file = {str(key_file)!r}: "
        f"HMAC key file {key_file} looks like hex text, but character 1 is 'g', "
        "which is not a hex digit, so the key is damaged; expected 64 hex digits"
    )
    assert "make a new key with 'dslo-edge keygen KEYFILE'" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_boolean_values_are_shown_as_toml(tmp_path: Path) -> None:
    _, port_message = config_error(tmp_path, {"mqtt": {"port": True}})
    _, requests_message = config_error(
        tmp_path, {"mqtt": {"protocol": "3.1.1"}, "requests": {"enabled": True}}
    )

    assert "mqtt.port = true is invalid" in port_message
    assert "requests.enabled = true is invalid" in requests_message


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"logging": {"file": 3}}, "logging.file = 3 is invalid; expected a string"),
        (
            {"mqtt": {"tls_insecure": 1}},
            "mqtt.tls_insecure = 1 is invalid; expected true or false",
        ),
        (
            {"mqtt": {"port": "1883"}},
            "mqtt.port = '1883' is invalid; expected an integer (a port in "
            "1..65535); write it without quotes, as port = 1883",
        ),
        (
            {"training": {"learning_rate": "0.05"}},
            "training.learning_rate = '0.05' is invalid; expected a finite number "
            "(a number in (0, 10]); write it without quotes, as "
            "learning_rate = 0.05",
        ),
        (
            {"mqtt": {"port": "0883"}},
            "mqtt.port = '0883' is invalid; expected an integer (a port in "
            "1..65535); write it without quotes, as port = 883",
        ),
        (
            {"training": {"learning_rate": " 5e-2"}},
            "write it without quotes, as learning_rate = 0.05",
        ),
        (
            {"mqtt": {"port": "mqtt"}},
            "mqtt.port = 'mqtt' is invalid; expected an integer (a port in 1..65535)",
        ),
    ],
)
def test_wrong_type_names_toml_type(
    tmp_path: Path, overrides: dict, fragment: str
) -> None:
    _, message = config_error(tmp_path, overrides)

    assert fragment in message


@pytest.mark.parametrize("key", ["bundle", "state_dir"])
def test_empty_device_path_is_rejected(tmp_path: Path, key: str) -> None:
    path, message = config_error(tmp_path, {"device": {key: ""}})

    assert f"{path}: device.{key} = '' is invalid; expected a non-empty path" in message


def test_password_without_username_is_rejected(tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text("secret\n")

    path, message = config_error(tmp_path, {"mqtt": {"password_file": "password"}})

    assert f"{path}: mqtt.password_file = '{password}' is invalid" in message
    assert "expected username to be set too" in message


@pytest.mark.parametrize("text", ["", "\n", "  \nsecret\n"])
def test_empty_password_line_is_rejected(tmp_path: Path, text: str) -> None:
    password = tmp_path / "password"
    password.write_text(text)
    mqtt = {"username": "dev-a", "password_file": "password"}

    path, message = config_error(tmp_path, {"mqtt": mqtt})

    assert message == (
        f"{path}: mqtt.password_file = '{password}' is invalid; expected a file "
        "whose first line is the password of user 'dev-a', not an empty line"
    )


def test_binary_password_file_exits_78(mlp_pair, tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_bytes(b"\xea\x00\xff not text\n")
    mqtt = {"username": "dev-a", "password_file": "password"}
    path = write(tmp_path, mlp_pair.bundle, {"mqtt": mqtt})

    result = run_cli("run", "--config", str(path))

    assert result.returncode == 78
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(
        f"error: cannot read mqtt.password_file {password}: 'utf-8' codec "
    )
    assert result.stderr.endswith(
        "expected a UTF-8 text file that the service's user can read, with the "
        "password on its first line\n"
    )


def test_log_file_under_file_exits_78(tmp_path: Path) -> None:
    blocker = tmp_path / "logs"
    blocker.write_text("a file where the log folder should be\n")
    log_file = blocker / "daemon.log"
    bundle = write_bundle(tmp_path / "bundle")
    path = write(tmp_path, bundle, {"logging": {"file": str(log_file)}})

    result = run_cli("run", "--config", str(path))

    assert result.returncode == 78
    assert result.stderr == (
        f"error: cannot open logging.file {log_file}: part of its path is a "
        "file, not a directory; set logging.file to a file in a directory that "
        "the daemon's user can write\n"
    )
    assert blocker.read_text() == "a file where the log folder should be\n"


def test_log_file_symlink_loop_exits_78(tmp_path: Path) -> None:
    loop = tmp_path / "daemon.log"
    loop.symlink_to("daemon.log")
    bundle = write_bundle(tmp_path / "bundle")
    path = write(tmp_path, bundle, {"logging": {"file": "daemon.log"}})

    result = run_cli("run", "--config", str(path))

    assert result.returncode == 78, result.stderr
    assert result.stderr == (
        f"error: cannot open logging.file {loop}: Too many levels of symbolic "
        "links; set logging.file to a file in a directory that the daemon's "
        "user can write\n"
    )


def test_log_file_that_is_config_exits_78(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    path = write(tmp_path, bundle, {"logging": {"metrics_file": "device.toml"}})
    content = path.read_text()

    result = run_cli("run", "--config", str(path))

    assert result.returncode == 78
    assert result.stderr == (
        f"error: {path}: logging.metrics_file {path} is this config file, which "
        "the daemon would append to and rotate away; choose another path\n"
    )
    assert path.read_text() == content


def test_one_file_for_both_logs_is_rejected(tmp_path: Path) -> None:
    path, message = config_error(
        tmp_path, {"logging": {"file": "daemon.log", "metrics_file": "daemon.log"}}
    )

    assert message == (
        f"{path}: logging.file and logging.metrics_file both name "
        f"{tmp_path / 'daemon.log'}; give each its own file"
    )


def test_log_file_that_is_default_metrics_log(tmp_path: Path) -> None:
    path, message = config_error(tmp_path, {"logging": {"file": "state/metrics.jsonl"}})

    assert message == (
        f"{path}: logging.file {tmp_path / 'state' / 'metrics.jsonl'} is the "
        "metrics log that the daemon writes to metrics.jsonl in "
        "device.state_dir, because logging.metrics_file is unset; give "
        "logging.file another path"
    )


def test_metrics_file_of_other_content_is_kept(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("calibration notes\n")

    path, message = config_error(tmp_path, {"logging": {"metrics_file": "notes.txt"}})

    assert message.startswith(
        f"{path}: logging.metrics_file {notes} is a file that is not a metrics log"
    )
    assert "choose another path or move the file aside" in message
    assert notes.read_text() == "calibration notes\n"


@pytest.mark.parametrize(
    "content", ["", '{"device": "dev-a", "applied": 3}\n', '{"device": "de', "\0\0"]
)
def test_existing_metrics_log_is_accepted(tmp_path: Path, content: str) -> None:
    (tmp_path / "metrics.jsonl").write_text(content)
    path = write(
        tmp_path, tmp_path / "bundle", {"logging": {"metrics_file": "metrics.jsonl"}}
    )

    config = load_config(path)

    assert config.logging.metrics_file == tmp_path / "metrics.jsonl"


def test_log_file_of_other_content_is_kept(tmp_path: Path) -> None:
    key = tmp_path / "hmac.key"
    key.write_text("6f1c2a9b8d7e6f5a4b3c2d1e0f9a8b7c\n")

    path, message = config_error(tmp_path, {"logging": {"file": "hmac.key"}})

    assert message.startswith(
        f"{path}: logging.file {key} is a file that is not a dslo-edge log"
    )
    assert "choose another path or move the file aside" in message
    assert key.read_text() == "6f1c2a9b8d7e6f5a4b3c2d1e0f9a8b7c\n"


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"2026-12-05 17:20:01,123 INFO dslo_edge.daemon: started\n",
        # A first line cut short, and zeros that a power cut can leave.
        b"2026-1",
        b"\0\0\0\0",
    ],
)
def test_existing_daemon_log_is_accepted(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "daemon.log").write_bytes(content)
    path = write(tmp_path, tmp_path / "bundle", {"logging": {"file": "daemon.log"}})

    config = load_config(path)

    assert config.logging.file == tmp_path / "daemon.log"


@pytest.mark.parametrize("key", ["file", "metrics_file"])
def test_log_pipe_is_accepted(tmp_path: Path, key: str) -> None:
    # RotatingFileHandler writes to a named pipe or a terminal without
    # rotating it. Reading one at start would wait for a writer or for
    # keyboard input.
    os.mkfifo(tmp_path / "log.pipe")
    path = write(tmp_path, tmp_path / "bundle", {"logging": {key: "log.pipe"}})
    code = (
        "import sys; from dslo_edge.config import load_config; "
        f"print(getattr(load_config(sys.argv[1]).logging, {key!r}))"
    )

    result = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        timeout=20,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{tmp_path / 'log.pipe'}\n"


def test_metrics_file_directory_exits_78(mlp_pair, tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    path = write(
        tmp_path, mlp_pair.bundle, {"logging": {"metrics_file": str(metrics_dir)}}
    )

    result = run_cli("run", "--config", str(path))

    assert result.returncode == 78
    assert result.stderr.splitlines() == [
        f"error: cannot open logging.metrics_file {metrics_dir}: it is a "
        "directory; set logging.metrics_file to a file in a directory that the "
        "daemon's user can write"
    ]
    assert "Traceback" not in result.stderr
    assert list(metrics_dir.iterdir()) == []


def test_default_metrics_file_error_names_default(mlp_pair, tmp_path: Path) -> None:
    # logging.metrics_file is unset, so the daemon opens state/metrics.jsonl.
    metrics_dir = tmp_path / "state" / "metrics.jsonl"
    metrics_dir.mkdir(parents=True)
    path = write(tmp_path, mlp_pair.bundle)

    result = run_cli("run", "--config", str(path))

    assert result.returncode == 78
    assert result.stderr.splitlines() == [
        f"error: cannot open {metrics_dir} (logging.metrics_file is unset, so the "
        "daemon uses metrics.jsonl in device.state_dir): it is a directory; make "
        f"{metrics_dir} a file that the daemon's user can write, or set "
        "logging.metrics_file to another file"
    ]
    assert list(metrics_dir.iterdir()) == []


@pytest.mark.parametrize(
    "host", ["mqtt://hub.lan", "hub.lan:1883", "hub lan", "hub.lan/x", "hub\tlan"]
)
def test_unresolvable_mqtt_host_is_rejected(tmp_path: Path, host: str) -> None:
    path, message = config_error(tmp_path, {"mqtt": {"host": host}})

    assert message == (
        f"{path}: mqtt.host = {host!r} is invalid; expected a host name or IP "
        "address without a scheme, port, '/' or whitespace, such as hub.local or "
        "192.168.1.10; set the port in mqtt.port"
    )


@pytest.mark.parametrize("host", ["hub.local", "10.0.0.2", "::1", "fe80::1%eth0"])
def test_mqtt_host_forms_are_accepted(tmp_path: Path, host: str) -> None:
    path = write(tmp_path, tmp_path / "bundle", {"mqtt": {"host": host}})

    assert load_config(path).mqtt.host == host


@pytest.mark.parametrize("key", ["max_payload_bytes", "max_samples"])
@pytest.mark.parametrize("value", [0, 268_435_456, 10**20])
def test_payload_limit_out_of_range_is_rejected(
    tmp_path: Path, key: str, value: int
) -> None:
    path, message = config_error(tmp_path, {"limits": {key: value}})

    assert message.startswith(f"{path}: limits.{key} = {value} is invalid")
    assert "in 1..268435455" in message


def test_payload_limits_at_maximum_are_accepted(tmp_path: Path) -> None:
    limits = {"max_payload_bytes": 268_435_455, "max_samples": 268_435_455}
    path = write(tmp_path, tmp_path / "bundle", {"limits": limits})

    config = load_config(path)

    assert config.limits.max_payload_bytes == 268_435_455
    assert config.limits.max_samples == 268_435_455
