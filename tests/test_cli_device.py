"""profiles, flash, inspect, ota-send and keygen through the dslo-edge command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from dslo_edge.cli import EXIT_CONFIG, EXIT_ERROR, main
from dslo_edge.config import load_config
from dslo_edge.profiles import load_profile
from tests.bundle_files import write_bundle


def run(*arguments: str):
    return CliRunner().invoke(main, list(arguments))


def test_profiles_list_shows_every_board() -> None:
    result = run("profiles", "list")
    assert result.exit_code == 0, result.output
    for name in ("raspberry-pi-zero-2w", "jetson-nano", "generic-x86_64"):
        assert name in result.output
    assert result.output.splitlines()[0].startswith("NAME")


def test_profiles_show_prints_fields() -> None:
    result = run("profiles", "show", "raspberry-pi-5")
    assert result.exit_code == 0, result.output
    assert "Raspberry Pi 5" in result.output
    assert "2.7 W idle, 7.5 W all cores busy" in result.output
    assert "thermal limit   75 C" in result.output


def test_profiles_show_unknown_name_is_config_error() -> None:
    result = run("profiles", "show", "pi9")
    assert result.exit_code == EXIT_CONFIG
    assert "firmware profile 'pi9' not found" in result.output


def test_profiles_check_fits_and_fails(tmp_path: Path) -> None:
    bundle = str(write_bundle(tmp_path / "bundle"))
    fits = run("profiles", "check", bundle, "--profile", "raspberry-pi-4b")
    assert fits.exit_code == 0, fits.output
    assert "interpreter  ai-edge-litert==2.3.0" in fits.output
    assert fits.output.rstrip().endswith("fits")

    fails = run("profiles", "check", bundle, "--profile", "jetson-nano")
    assert fails.exit_code == EXIT_ERROR
    assert "problem: JetPack 4.6" in fails.output
    assert "does not fit profile jetson-nano" in fails.output


def test_profiles_check_rejects_bad_probe(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    probe = bundle / "probe.npz"
    # Label 10 is outside the bundle's classes 0..9.
    np.savez(probe, x=np.zeros((2, 64), np.float32), y=np.array([0, 10]))

    result = run("profiles", "check", str(bundle), "--profile", "raspberry-pi-4b")

    assert result.exit_code == EXIT_ERROR, result.output
    assert result.output == (
        f"error: probe set {probe} has labels 0..10, but the student has 10 "
        "classes; expected labels in 0..9\n"
    )


def test_profiles_check_two_head_bundle(two_head_bundle: Path) -> None:
    result = run(
        "profiles", "check", str(two_head_bundle), "--profile", "raspberry-pi-4b"
    )

    assert result.exit_code == 0, result.output
    assert "smoothing_store" in result.output
    assert result.output.rstrip().endswith("fits")


def test_flash_command_installs_and_repeats(tmp_path: Path) -> None:
    bundle = str(write_bundle(tmp_path / "bundle"))
    target = tmp_path / "rootfs"
    target.mkdir()
    arguments = [
        "flash",
        bundle,
        "--profile",
        "raspberry-pi-zero-2w",
        "--target",
        str(target),
        "--device-id",
        "porch",
        "--broker-host",
        "hub.lan",
    ]
    first = run(*arguments)
    assert first.exit_code == 0, first.output
    assert "wrote /etc/dslo-edge/device.toml" in first.output
    device_toml = (target / "etc/dslo-edge/device.toml").read_text()
    assert 'id = "porch"' in device_toml
    assert 'host = "hub.lan"' in device_toml

    second = run(*arguments)
    assert second.exit_code == 0, second.output
    assert "0 paths written, 6 unchanged" in second.output


def test_flash_command_keeps_edited_config(tmp_path: Path) -> None:
    bundle = str(write_bundle(tmp_path / "bundle"))
    target = tmp_path / "rootfs"
    target.mkdir()
    arguments = ["flash", bundle, "--profile", "raspberry-pi-4b"]
    arguments += ["--target", str(target)]
    assert run(*arguments).exit_code == 0
    config = target / "etc/dslo-edge/device.toml"
    generated = config.read_text()
    assert 'profile = "raspberry-pi-4b"' in generated
    edited = generated + '\n[security]\nhmac_key_file = "hmac.key"\n'
    config.write_text(edited)

    second = run(*arguments)

    assert second.exit_code == 0, second.output
    assert "wrote /etc/dslo-edge/device.toml\n" not in second.output
    assert "wrote /etc/dslo-edge/device.toml.new" in second.output
    assert "warning: kept /etc/dslo-edge/device.toml because it differs" in (
        second.output
    )
    assert config.read_text() == edited
    assert (target / "etc/dslo-edge/device.toml.new").read_text() == generated

    replaced = run(*arguments, "--replace-config")

    assert replaced.exit_code == 0, replaced.output
    assert "wrote /etc/dslo-edge/device.toml.bak" in replaced.output
    assert "wrote /etc/dslo-edge/device.toml\n" in replaced.output
    assert "removed /etc/dslo-edge/device.toml.new" in replaced.output
    assert config.read_text() == generated
    assert (target / "etc/dslo-edge/device.toml.bak").read_text() == edited


def test_flash_command_rejects_bad_device_id(tmp_path: Path) -> None:
    bundle = str(write_bundle(tmp_path / "bundle"))
    target = tmp_path / "rootfs"
    target.mkdir()

    result = run(
        "flash",
        bundle,
        "--profile",
        "raspberry-pi-4b",
        "--target",
        str(target),
        "--device-id",
        "my/dev",
    )

    assert result.exit_code == EXIT_CONFIG
    assert result.output == (
        "error: --device-id 'my/dev' is invalid: expected a non-empty name "
        "without '/', '+', '#', whitespace or NUL, for example 'kitchen-cam'\n"
    )
    assert list(target.iterdir()) == []


def test_flash_command_rejects_profile_name_as_id(tmp_path: Path) -> None:
    bundle = str(write_bundle(tmp_path / "bundle"))
    target = tmp_path / "rootfs"
    target.mkdir()
    profile = tmp_path / "my board.toml"
    text = load_profile("raspberry-pi-4b").source.read_text()
    profile.write_text(text.replace('"raspberry-pi-4b"', '"my board"', 1))

    result = run("flash", bundle, "--profile", str(profile), "--target", str(target))

    assert result.exit_code == EXIT_CONFIG
    assert "error: device id 'my board' is invalid" in result.output
    assert "the device id defaults to the profile name, so pass --device-id" in (
        result.output
    )
    assert list(target.iterdir()) == []


def _flash_into_empty_target(tmp_path: Path, *options: str):
    bundle = str(write_bundle(tmp_path / "bundle"))
    target = tmp_path / "rootfs"
    target.mkdir()
    arguments = ["flash", bundle, "--profile", "raspberry-pi-4b"]
    return run(*arguments, "--target", str(target), *options), target


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--broker-host", 'evil"host'],
            "error: --broker-host 'evil\"host' is invalid: expected a host name or "
            "IP address of 1 to 253 letters, digits, '-', '.' or ':', without "
            "spaces or quotes, for example hub.local or 192.168.1.10, or an IPv6 "
            "address with a zone id, such as fe80::1%eth0\n",
        ),
        (["--broker-host", ""], "error: --broker-host '' is invalid: expected"),
        (["--broker-host", "hub%eth0"], "error: --broker-host 'hub%eth0' is"),
        (
            ["--broker-host", "10.0.0.2:8883"],
            "error: --broker-host '10.0.0.2:8883' is invalid: it contains a port; "
            "give the host alone, such as '10.0.0.2', and the port with "
            "--broker-port\n",
        ),
        (
            ["--broker-host", "mqtt://hub.local"],
            "error: --broker-host 'mqtt://hub.local' is invalid: it is a URL; give "
            "the host alone, such as 'hub.local', and the port with --broker-port\n",
        ),
        (
            ["--broker-host", "mqtts://[fd00::1]:8883"],
            "error: --broker-host 'mqtts://[fd00::1]:8883' is invalid: it is a URL; "
            "give the host alone, such as 'fd00::1', and the port with",
        ),
        (
            ["--broker-host", "mqtt://[fd00::1"],
            "error: --broker-host 'mqtt://[fd00::1' is invalid: it is a URL; give "
            "the host alone and the port with --broker-port\n",
        ),
        (["--broker-host", "fe80::1%"], "error: --broker-host 'fe80::1%' is"),
        (["--broker-host", 'fe80::1%"x'], "error: --broker-host 'fe80::1%\"x' is"),
        (["--broker-host", "hub local"], "error: --broker-host 'hub local' is"),
        (["--broker-host", "hub\nlocal"], "error: --broker-host 'hub\\nlocal' is"),
        (["--broker-host", "a" * 254], "is invalid: expected a host name"),
        (
            ["--broker-port", "0"],
            "error: --broker-port '0' is invalid: expected a port number from 1 "
            "to 65535, for example 1883 (MQTT) or 8883 (MQTT over TLS)\n",
        ),
        (["--broker-port", "65536"], "error: --broker-port '65536' is invalid"),
        (["--broker-port", "-1"], "error: --broker-port '-1' is invalid"),
        (["--broker-port", "mqtt"], "error: --broker-port 'mqtt' is invalid"),
    ],
)
def test_flash_command_rejects_bad_broker(tmp_path: Path, options, message) -> None:
    result, target = _flash_into_empty_target(tmp_path, *options)

    assert result.exit_code == EXIT_CONFIG
    assert message in result.output
    assert len(result.output.splitlines()) == 1
    assert list(target.iterdir()) == []


@pytest.mark.parametrize(
    ("options", "host", "port"),
    [
        (["--broker-host", "hub.local", "--broker-port", "8883"], "hub.local", 8883),
        (["--broker-host", "fd00::1"], "fd00::1", 1883),
        (["--broker-host", "fe80::1%eth0"], "fe80::1%eth0", 1883),
        (["--broker-host", "10.0.0.2", "--broker-port", "65535"], "10.0.0.2", 65535),
    ],
)
def test_flash_command_writes_broker(tmp_path: Path, options, host, port) -> None:
    result, target = _flash_into_empty_target(tmp_path, *options)

    assert result.exit_code == 0, result.output
    config = load_config(target / "etc/dslo-edge/device.toml")
    assert config.mqtt.host == host
    assert config.mqtt.port == port


def _set_class_count(manifest: dict[str, Any]) -> Any:
    manifest["class_count"] = "ten"
    return manifest


def _set_weight_shape(manifest: dict[str, Any]) -> Any:
    manifest["student"]["weights"]["dense_bias"] = "32"
    return manifest


def _set_one_class(manifest: dict[str, Any]) -> Any:
    manifest["class_count"] = 1
    return manifest


def _set_one_class_head(manifest: dict[str, Any]) -> Any:
    classes = manifest.pop("class_count")
    manifest["heads"] = [
        {"name": "digit", "class_count": classes, "teacher_output_kind": "logits"},
        {"name": "odd", "class_count": 1, "teacher_output_kind": "logits"},
    ]
    return manifest


def _drop_teacher_file(manifest: dict[str, Any]) -> Any:
    del manifest["teacher"]["file"]
    return manifest


def _point_student_outside(manifest: dict[str, Any]) -> Any:
    # The path leads back to the same file, so only the path itself is wrong.
    manifest["student"]["file"] = "../bundle/student.tflite"
    return manifest


def _set_input_shape(manifest: dict[str, Any]) -> Any:
    manifest["input"]["shape"] = [None, 64.5]
    return manifest


def _keep_batch_dimension_only(manifest: dict[str, Any]) -> Any:
    manifest["input"]["shape"] = [None]
    return manifest


def _set_input_dtype(manifest: dict[str, Any]) -> Any:
    manifest["input"]["dtype"] = "complex128"
    return manifest


def _set_output_kind(manifest: dict[str, Any]) -> Any:
    manifest["teacher"]["output_kind"] = "softmax"
    return manifest


BAD_MANIFESTS = [
    (
        lambda manifest: [1, 2],
        "contains [1, 2] (an array); expected an object with the keys "
        "format_version, input, student and teacher",
    ),
    (
        _set_class_count,
        ': key class_count is "ten" (a string); expected an integer from 2 to 65535',
    ),
    (
        _set_one_class,
        ": key class_count is 1 (an integer); expected an integer from 2 to 65535",
    ),
    (
        _set_one_class_head,
        ": key heads[1].class_count is 1 (an integer); expected an integer from 2 "
        "to 65535",
    ),
    (
        _set_weight_shape,
        ': key student.weights.dense_bias is "32" (a string); expected an array',
    ),
    (
        _drop_teacher_file,
        ": key teacher.file is missing; expected a file name in the bundle "
        "directory, without '/'",
    ),
    (
        _point_student_outside,
        ': key student.file is "../bundle/student.tflite" (a string); expected '
        "a file name in the bundle directory, without '/'",
    ),
    (
        _set_input_shape,
        ": key input.shape[1] is 64.5 (a number); expected an integer of at least 1",
    ),
    (
        _keep_batch_dimension_only,
        ": key input.shape is [null]; expected the batch dimension followed by "
        "at least one sample dimension, such as [null, 64]",
    ),
    (
        _set_output_kind,
        ': key teacher.output_kind is "softmax" (a string); expected '
        '"probabilities" or "logits"',
    ),
    (
        _set_input_dtype,
        ': key input.dtype is "complex128" (a string); expected "float32", the '
        "input type of dslo-edge updates",
    ),
]


@pytest.mark.parametrize(("edit", "fragment"), BAD_MANIFESTS)
@pytest.mark.parametrize("command", ["inspect", "flash", "ota-send"])
def test_bad_manifest_names_file_and_key(
    tmp_path: Path, command: str, edit, fragment: str
) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    manifest_path = bundle / "manifest.json"
    manifest = edit(json.loads(manifest_path.read_text()))
    manifest_path.write_text(json.dumps(manifest))
    target = tmp_path / "rootfs"
    target.mkdir()
    options = {
        "inspect": [],
        "flash": ["--profile", "raspberry-pi-4b", "--target", str(target)],
        "ota-send": ["--device", "kitchen", "--broker", "mqtt://127.0.0.1:1"],
    }[command]

    result = run(command, str(bundle), *options)

    assert result.exit_code == EXIT_ERROR, result.output
    assert result.output.startswith(f"error: {manifest_path}")
    assert fragment in result.output
    assert result.output.rstrip().endswith(
        "convert the models again with 'dslo-edge convert'"
    )
    assert len(result.output.splitlines()) == 1
    assert list(target.iterdir()) == []


def test_keygen_names_missing_directory(tmp_path: Path) -> None:
    directory = tmp_path / "missing"

    result = run("keygen", str(directory / "device.key"))

    # Exit status 2, as for convert's or demo's unwritable --out.
    assert result.exit_code == 2
    assert result.output.endswith(
        f"Error: Invalid value for 'PATH': cannot write {directory / 'device.key'}: "
        f"directory {directory} does not exist; create it first or choose "
        "another path\n"
    )
    assert not directory.exists()


def test_keygen_rejects_file_as_directory(tmp_path: Path) -> None:
    parent = tmp_path / "notes.txt"
    parent.write_text("not a directory\n")

    result = run("keygen", str(parent / "device.key"))

    assert result.exit_code == 2
    assert "Error: Invalid value for 'PATH': cannot write " in result.output
    assert f"{parent} is a file, not a directory" in result.output
    assert parent.read_text() == "not a directory\n"


def test_keygen_existing_key_exits_78(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    path.write_text("old key\n")

    result = run("keygen", str(path))

    assert result.exit_code == EXIT_CONFIG
    assert result.output == (
        f"error: {path} exists, and keygen never overwrites a key; remove the "
        "file first to replace its key (the device and the hub then need the "
        "new one), or choose another path\n"
    )
    assert path.read_text() == "old key\n"


@pytest.mark.parametrize("path", ["", "  "])
def test_keygen_rejects_empty_path(path: str) -> None:
    result = run("keygen", path)

    assert result.exit_code == 2
    assert f"Invalid value for 'PATH': expected a file path, got {path!r}" in (
        result.output
    )
    assert "exists" not in result.output


@pytest.mark.parametrize(
    "command", [["keygen"], ["demo", "--report"], ["selftest", "--report"]]
)
def test_file_option_rejects_folder_path(tmp_path: Path, command: list) -> None:
    folder = f"{tmp_path}/keys/"

    result = run(*command, folder)

    assert result.exit_code == 2
    assert f"expected a file path, got the folder {folder!r}" in result.output
    assert "add a file name after the slash" in result.output
    assert not (tmp_path / "keys").exists()


def test_keygen_writes_owner_only_key(tmp_path: Path) -> None:
    path = tmp_path / "device.key"

    result = run("keygen", str(path))

    assert result.exit_code == 0, result.output
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(bytes.fromhex(path.read_text().strip())) == 32


@pytest.mark.parametrize(
    ("command", "option"), [("ota-send", "--device"), ("flash", "--device-id")]
)
def test_hub_level_device_id_is_rejected(
    tmp_path: Path, mosquitto, command: str, option: str
) -> None:
    from tests.hub_fleet import subscribed_client

    bundle = str(write_bundle(tmp_path / "bundle"))
    target = tmp_path / "rootfs"
    target.mkdir()
    options = {
        "ota-send": ["--broker", mosquitto.url, "--timeout", "2"],
        "flash": ["--profile", "raspberry-pi-4b", "--target", str(target)],
    }[command]
    watcher, received = subscribed_client(mosquitto.port, "dslo/#")
    try:
        result = run(command, bundle, option, "_hub", *options)
        watcher.publish("dslo/check/done", b"", qos=1).wait_for_publish(5)
        last = received.get(timeout=5)
    finally:
        watcher.disconnect()
        watcher.loop_stop()

    assert result.exit_code == EXIT_CONFIG, result.output
    name = "device id" if command == "ota-send" else "--device-id"
    assert result.output == (
        f"error: {name} '_hub' is invalid: the hub workers' own topics use that "
        "level, so no device can have it\n"
    )
    # The first message the watcher received is its own, so nothing went to
    # the hub's topics before it.
    assert last.topic == "dslo/check/done"
    assert list(target.iterdir()) == []
