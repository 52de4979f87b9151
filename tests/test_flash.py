"""Flash: install a bundle, config and unit into a temporary device root."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import subprocess
from collections import namedtuple
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dslo_edge.bundle import load_bundle
from dslo_edge.cli import EXIT_CONFIG, main
from dslo_edge.config import load_config
from dslo_edge.daemon import EdgeDaemon
from dslo_edge.errors import BundleError, ConfigError
from dslo_edge.flash import (
    BUNDLE_LINK,
    FlashOptions,
    FlashResult,
    flash,
    on_target,
    release_id,
    verify_installation,
)
from dslo_edge.flash_config import render_device_config
from dslo_edge.profiles import load_profile, load_profile_file
from dslo_edge.service import EXIT_CONFIG as UNIT_EXIT_CONFIG
from dslo_edge.service import render_unit
from tests.bundle_files import write_bundle

OPTIONS = FlashOptions("kitchen-cam", broker_host="hub.local", broker_port=8883)
SECURITY_TABLE = '\n[security]\nhmac_key_file = "/etc/dslo-edge/hmac.key"\n'
Usage = namedtuple("Usage", "total used free")


@pytest.fixture
def pi4():
    return load_profile("raspberry-pi-4b")


def installed_files(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and not path.is_symlink()
    }


def symlinks_under(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): os.readlink(path)
        for path in sorted(root.rglob("*"))
        if path.is_symlink()
    }


def flash_once(tmp_path: Path, pi4) -> tuple[Path, Path]:
    """Flash a test bundle into tmp_path/rootfs and return the bundle and root."""
    bundle = write_bundle(tmp_path / "bundle")
    root = tmp_path / "rootfs"
    root.mkdir()
    flash(bundle, pi4, root, OPTIONS)
    return bundle, root


def test_flash_installs_complete_layout(tmp_path: Path, pi4) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    root = tmp_path / "rootfs"
    root.mkdir()
    result = flash(bundle, pi4, root, OPTIONS)
    release = release_id(load_bundle(bundle))

    assert result.release == release
    link = root / "opt/dslo-edge/bundle"
    assert os.readlink(link) == f"releases/{release}"
    assert load_bundle(link).manifest["class_count"] == 10
    wants = root / "etc/systemd/system/multi-user.target.wants/dslo-edge.service"
    assert os.readlink(wants) == "../dslo-edge.service"
    assert (root / "var/lib/dslo-edge").is_dir()
    unit = (root / "etc/systemd/system/dslo-edge.service").read_text()
    assert "ExecStart=/opt/dslo-edge/venv/bin/dslo-edge run --config" in unit

    config = load_config(root / "etc/dslo-edge/device.toml")
    assert config.device_id == "kitchen-cam"
    assert config.mqtt.host == "hub.local"
    assert config.mqtt.port == 8883
    assert config.bundle == Path("/opt/dslo-edge/bundle")
    assert config.state_dir == Path("/var/lib/dslo-edge")

    listing = json.loads((root / "opt/dslo-edge/installed.json").read_text())
    assert listing["profile"] == "raspberry-pi-4b"
    assert listing["release"] == release
    assert set(listing["files"]) == {
        f"/opt/dslo-edge/releases/{release}/manifest.json",
        f"/opt/dslo-edge/releases/{release}/student.tflite",
        f"/opt/dslo-edge/releases/{release}/teacher.tflite",
        "/etc/dslo-edge/device.toml",
        "/etc/systemd/system/dslo-edge.service",
    }
    assert verify_installation(root) == []


def test_flash_again_changes_nothing(tmp_path: Path, pi4) -> None:
    bundle, root = flash_once(tmp_path, pi4)
    before = installed_files(root)
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}

    again = flash(bundle, pi4, root, OPTIONS)

    assert again.changed == []
    assert len(again.unchanged) == 6
    assert "/etc/dslo-edge/device.toml" in again.unchanged
    assert again.warnings == []
    assert installed_files(root) == before
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


@pytest.fixture
def strict_umask() -> Iterator[None]:
    """Run the test with umask 077, which leaves new files readable by the owner."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def modes_under(root: Path) -> dict[str, int]:
    return {
        str(path.relative_to(root)): stat.S_IMODE(path.stat().st_mode)
        for path in sorted(root.rglob("*"))
        if not path.is_symlink()
    }


def test_flash_output_is_readable_by_all(tmp_path: Path, pi4, strict_umask) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    root = tmp_path / "rootfs"
    root.mkdir()

    result = flash(bundle, pi4, root, OPTIONS)

    modes = modes_under(root)
    release = f"opt/dslo-edge/releases/{result.release}"
    assert modes[release] == 0o755
    assert modes[f"{release}/student.tflite"] == 0o644
    assert modes["etc/dslo-edge/device.toml"] == 0o644
    assert modes["var/lib/dslo-edge"] == 0o755
    for name, mode in modes.items():
        expected = 0o755 if (root / name).is_dir() else 0o644
        assert mode == expected, name


def test_flash_repairs_private_release_mode(tmp_path: Path, pi4) -> None:
    bundle, root = flash_once(tmp_path, pi4)
    release = root / "opt/dslo-edge/releases" / release_id(load_bundle(bundle))
    # Earlier versions of flash left the release directory with mode 0700.
    release.chmod(0o700)
    (release / "manifest.json").chmod(0o600)

    again = flash(bundle, pi4, root, OPTIONS)

    assert stat.S_IMODE(release.stat().st_mode) == 0o755
    assert stat.S_IMODE((release / "manifest.json").stat().st_mode) == 0o644
    assert again.changed == [f"/opt/dslo-edge/releases/{release.name}"]
    assert flash(bundle, pi4, root, OPTIONS).changed == []


def test_flash_new_bundle_keeps_previous_release(tmp_path: Path, pi4) -> None:
    root = tmp_path / "rootfs"
    root.mkdir()
    releases = []
    for seed in range(3):
        bundle = write_bundle(tmp_path / f"bundle-{seed}", seed=seed)
        releases.append(flash(bundle, pi4, root, OPTIONS).release)
    remaining = sorted(p.name for p in (root / "opt/dslo-edge/releases").iterdir())
    assert remaining == sorted(releases[1:])
    assert os.readlink(root / "opt/dslo-edge/bundle") == f"releases/{releases[2]}"
    assert verify_installation(root) == []


# The mtimes of the first and second release: a tie, and a first release
# that looks newer, as after the clock of a board without a real-time clock
# stepped back.
@pytest.mark.parametrize(
    "mtimes_ns",
    [(1_700_000_000 * 10**9,) * 2, (1_800_000_000 * 10**9, 1_700_000_000 * 10**9)],
)
def test_flash_prune_keeps_linked_release(tmp_path: Path, pi4, mtimes_ns) -> None:
    root = tmp_path / "rootfs"
    root.mkdir()
    folder = root / "opt/dslo-edge/releases"
    releases = []
    for seed in range(3):
        if seed == 2:
            for release, mtime_ns in zip(releases, mtimes_ns, strict=True):
                os.utime(folder / release, ns=(mtime_ns, mtime_ns))
        bundle = write_bundle(tmp_path / f"bundle-{seed}", seed=seed)
        releases.append(flash(bundle, pi4, root, OPTIONS).release)

    remaining = sorted(path.name for path in folder.iterdir())

    # The second release, which the bundle link named before, stays.
    assert remaining == sorted(releases[1:])
    assert os.readlink(root / "opt/dslo-edge/bundle") == f"releases/{releases[2]}"


def test_flash_repairs_a_damaged_release(tmp_path: Path, pi4) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    root = tmp_path / "rootfs"
    root.mkdir()
    result = flash(bundle, pi4, root, OPTIONS)
    student = root / f"opt/dslo-edge/releases/{result.release}/student.tflite"
    student.write_bytes(b"corrupt")
    assert verify_installation(root) == [
        f"/opt/dslo-edge/releases/{result.release}/student.tflite"
    ]

    repaired = flash(bundle, pi4, root, OPTIONS)

    assert f"/opt/dslo-edge/releases/{result.release}" in repaired.changed
    assert verify_installation(root) == []


def write_probe(bundle: Path, labels: list[int]) -> bytes:
    """Write a probe.npz for the 64-input, 10-class test bundle; return its bytes."""
    x = np.zeros((len(labels), 64), dtype=np.float32)
    np.savez(bundle / "probe.npz", x=x, y=np.array(labels))
    return (bundle / "probe.npz").read_bytes()


def test_flash_installs_probe_added_later(tmp_path: Path, pi4) -> None:
    bundle, root = flash_once(tmp_path, pi4)
    releases = root / "opt/dslo-edge/releases"
    without_probe = release_id(load_bundle(bundle))

    first = write_probe(bundle, [0, 1])
    added = flash(bundle, pi4, root, OPTIONS)

    # The release id covers probe.npz, so each probe set is its own release.
    assert added.release != without_probe
    assert f"/opt/dslo-edge/releases/{added.release}" in added.changed
    assert (releases / added.release / "probe.npz").read_bytes() == first
    assert os.readlink(root / "opt/dslo-edge/bundle") == f"releases/{added.release}"
    assert verify_installation(root) == []

    second = write_probe(bundle, [2, 3, 4])
    changed = flash(bundle, pi4, root, OPTIONS)

    assert changed.release not in (without_probe, added.release)
    assert f"/opt/dslo-edge/releases/{changed.release}" in changed.changed
    assert (releases / changed.release / "probe.npz").read_bytes() == second

    (bundle / "probe.npz").unlink()
    removed = flash(bundle, pi4, root, OPTIONS)

    assert removed.release == without_probe
    assert f"/opt/dslo-edge/releases/{without_probe}" in removed.changed
    assert not (releases / without_probe / "probe.npz").exists()
    assert verify_installation(root) == []


def test_flash_replaces_changed_bundle_file(tmp_path: Path, pi4) -> None:
    bundle, root = flash_once(tmp_path, pi4)
    release = root / f"opt/dslo-edge/releases/{release_id(load_bundle(bundle))}"
    (bundle / "README.txt").write_text("first notes")
    flash(bundle, pi4, root, OPTIONS)

    (bundle / "README.txt").write_text("second notes")
    changed = flash(bundle, pi4, root, OPTIONS)

    assert "/" + str(release.relative_to(root)) in changed.changed
    assert (release / "README.txt").read_text() == "second notes"


def test_flash_rejects_probe_daemon_rejects(tmp_path: Path, pi4) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    write_probe(bundle, [0, 10])
    root = tmp_path / "rootfs"
    root.mkdir()

    with pytest.raises(BundleError) as caught:
        flash(bundle, pi4, root, OPTIONS)

    assert str(bundle / "probe.npz") in str(caught.value)
    assert "0..9" in str(caught.value)
    assert list(root.iterdir()) == []


def test_flash_rejects_bundle_profile_cannot_run(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    root = tmp_path / "rootfs"
    root.mkdir()
    with pytest.raises(BundleError, match="profile jetson-nano cannot run"):
        flash(bundle, load_profile("jetson-nano"), root, OPTIONS)
    assert list(root.iterdir()) == []


def test_flash_rejects_invalid_device_id(tmp_path: Path, pi4) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    root = tmp_path / "rootfs"
    root.mkdir()
    with pytest.raises(ConfigError) as caught:
        flash(bundle, pi4, root, FlashOptions("kitchen/cam"))
    assert str(caught.value) == (
        "device id 'kitchen/cam' is invalid: expected a non-empty name without "
        "'/', '+', '#', whitespace or NUL, for example 'kitchen-cam'"
    )
    assert list(root.iterdir()) == []


@pytest.mark.parametrize(
    "linked",
    ["etc/dslo-edge", "opt", "etc/systemd/system", "var/lib/dslo-edge"],
)
def test_flash_rejects_link_out_of_target(tmp_path: Path, pi4, linked: str) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    root = tmp_path / "rootfs"
    # An absolute link as a device image may hold. Under the mount point it
    # names a directory of the machine that runs flash.
    outside = tmp_path / "host" / linked
    outside.mkdir(parents=True)
    link = root / linked
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    before = sorted(str(path.relative_to(root)) for path in root.rglob("*"))

    result = CliRunner().invoke(
        main,
        ["flash", str(bundle), "--profile", "raspberry-pi-4b", "--target", str(root)],
    )

    assert result.exit_code == 1, result.output
    assert result.output.count("\n") == 1
    assert f"outside the target {root}, because of a symlink" in result.output
    assert list(outside.iterdir()) == []
    after = sorted(str(path.relative_to(root)) for path in root.rglob("*"))
    assert after == before


@pytest.mark.parametrize(
    ("links", "loop"),
    [
        ({"opt": "opt"}, "opt"),
        ({"etc/dslo-edge": "../etc/dslo-edge"}, "etc/dslo-edge"),
        # Two links that name each other, reached through a third.
        (
            {"var/lib/a": "b", "var/lib/b": "a", "var/lib/dslo-edge": "a"},
            "var/lib/dslo-edge",
        ),
    ],
)
def test_flash_rejects_symlink_loop(tmp_path: Path, links: dict, loop: str) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    root = tmp_path / "rootfs"
    for name, link_target in links.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(link_target)
    before = sorted(str(path.relative_to(root)) for path in root.rglob("*"))

    result = CliRunner().invoke(
        main,
        ["flash", str(bundle), "--profile", "raspberry-pi-4b", "--target", str(root)],
    )

    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.output.count("\n") == 1
    assert result.output.startswith(f"error: {root / loop} is a symlink loop")
    assert "remove that symlink (flash creates what is missing)" in result.output
    after = sorted(str(path.relative_to(root)) for path in root.rglob("*"))
    assert after == before


def test_flash_warns_of_active_ota_release(tmp_path: Path, pi4) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    flashed = release_id(load_bundle(bundle))
    root = tmp_path / "rootfs"
    releases = root / "var/lib/dslo-edge/bundles"
    (releases / "0123456789abcdef").mkdir(parents=True)
    (releases / "active").symlink_to("0123456789abcdef")

    other_active = flash(bundle, pi4, root, OPTIONS)
    (releases / flashed).mkdir()
    (releases / "active").unlink()
    (releases / "active").symlink_to(flashed)
    same_active = flash(bundle, pi4, root, OPTIONS)

    assert other_active.warnings == [
        "the device runs the over-the-air release 0123456789abcdef that "
        "/var/lib/dslo-edge/bundles/active points to, and not the bundle "
        "flashed now; send this bundle with 'dslo-edge ota-send' instead, or "
        "remove that link on the target to run the flashed bundle"
    ]
    assert same_active.warnings == []


def test_flash_warns_of_active_link_loop(tmp_path: Path, pi4) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    root = tmp_path / "rootfs"
    releases = root / "var/lib/dslo-edge/bundles"
    releases.mkdir(parents=True)
    (releases / "active").symlink_to("active")

    result = flash(bundle, pi4, root, OPTIONS)

    assert (root / "opt/dslo-edge/installed.json").is_file()
    assert result.warnings == [
        "/var/lib/dslo-edge/bundles/active on the target is a symlink loop, "
        "and the daemon does not start while it is there; remove that link on "
        "the target to run the flashed bundle"
    ]


def test_flash_follows_relative_link(tmp_path: Path, pi4) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    root = tmp_path / "rootfs"
    (root / "data" / "opt").mkdir(parents=True)
    (root / "opt").symlink_to("data/opt")

    result = flash(bundle, pi4, root, OPTIONS)

    installed = root / "data/opt/dslo-edge/releases" / result.release
    assert load_bundle(installed).manifest["class_count"] == 10
    assert (root / "data/opt/dslo-edge/installed.json").is_file()


def test_flash_to_this_machine_root_needs_flag(tmp_path: Path, monkeypatch) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    # A stand-in for the install, so that no run of this test writes into /.
    targets: list[str] = []

    def record_target(_bundle, _profile, target, _options, replace_config):
        targets.append(target)
        return FlashResult(Path(target), "0123456789ab", None)  # type: ignore[arg-type]

    monkeypatch.setattr("dslo_edge.flash.flash", record_target)
    link_to_root = tmp_path / "root-link"
    link_to_root.symlink_to("/")
    arguments = ["flash", str(bundle), "--profile", "raspberry-pi-4b"]

    rejected = CliRunner().invoke(main, [*arguments, "--target", "/"])
    rejected_link = CliRunner().invoke(
        main, [*arguments, "--target", str(link_to_root)]
    )
    allowed = CliRunner().invoke(main, [*arguments, "--target", "/", "--this-machine"])

    assert rejected.exit_code == 2
    assert "/ is the root of this machine" in rejected.output
    assert "pass --this-machine when this machine is the device" in rejected.output
    assert rejected_link.exit_code == 2
    assert f"{link_to_root} is the root of this machine" in rejected_link.output
    assert allowed.exit_code == 0, allowed.output
    assert targets == ["/"]


def test_flash_hint_installs_source_tree(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    root = tmp_path / "rootfs"
    root.mkdir()

    result = CliRunner().invoke(
        main,
        ["flash", str(bundle), "--profile", "raspberry-pi-4b", "--target", str(root)],
    )

    assert result.exit_code == 0, result.output
    hint = result.output.splitlines()[-1]
    # dslo-edge is not on PyPI, so the device installs it from a copy of the
    # source tree; "pip install dslo-edge" fails there.
    assert "is not on PyPI" in hint
    assert hint.endswith(
        "python3 -m venv /opt/dslo-edge/venv && "
        "/opt/dslo-edge/venv/bin/pip install ./dslo-edge"
    )


def test_flash_config_error_names_device_path() -> None:
    options = FlashOptions("porch", broker_port=0)
    with pytest.raises(ConfigError) as caught:
        render_device_config(options, BUNDLE_LINK, "raspberry-pi-4b")
    assert str(caught.value).startswith(
        "generated /etc/dslo-edge/device.toml: mqtt.port = 0 is invalid"
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            FlashOptions("porch", broker_host=""),
            "broker host '' is invalid: expected a host name or IP address",
        ),
        (
            FlashOptions("porch", broker_host='hub"local'),
            "broker host 'hub\"local' is invalid",
        ),
        (
            FlashOptions("porch", broker_port=65536),
            "broker port '65536' is invalid: expected a port number from 1 to 65535",
        ),
    ],
)
def test_flash_rejects_bad_broker(tmp_path: Path, pi4, options, message) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    root = tmp_path / "rootfs"
    root.mkdir()
    with pytest.raises(ConfigError) as caught:
        flash(bundle, pi4, root, options)
    assert str(caught.value).startswith(message)
    assert list(root.iterdir()) == []


def test_flash_keeps_edited_config(tmp_path: Path, pi4) -> None:
    bundle, root = flash_once(tmp_path, pi4)
    config = root / "etc/dslo-edge/device.toml"
    generated = config.read_bytes()
    config.write_text(config.read_text() + SECURITY_TABLE)
    config.chmod(0o600)
    edited = config.read_bytes()

    second = flash(bundle, pi4, root, OPTIONS)

    pending = root / "etc/dslo-edge/device.toml.new"
    assert config.read_bytes() == edited
    assert pending.read_bytes() == generated
    assert stat.S_IMODE(pending.stat().st_mode) == 0o600
    assert not (root / "etc/dslo-edge/device.toml.bak").exists()
    assert "/etc/dslo-edge/device.toml" not in second.changed
    assert "/etc/dslo-edge/device.toml.new" in second.changed
    assert second.warnings == [
        "kept /etc/dslo-edge/device.toml because it differs from the generated "
        "config, which is in /etc/dslo-edge/device.toml.new: merge the two by "
        "hand, or run flash again with --replace-config to install it and keep "
        "the old file as /etc/dslo-edge/device.toml.bak"
    ]
    assert config.read_text().endswith(SECURITY_TABLE)

    third = flash(bundle, pi4, root, OPTIONS)

    assert third.changed == []
    assert third.warnings == second.warnings
    assert config.read_bytes() == edited
    assert verify_installation(root) == []


def test_new_options_replace_unedited_config(tmp_path: Path, pi4) -> None:
    bundle, root = flash_once(tmp_path, pi4)
    config = root / "etc/dslo-edge/device.toml"
    config.chmod(0o600)
    moved = FlashOptions("kitchen-cam", broker_host="hub2.local", broker_port=8883)

    second = flash(bundle, pi4, root, moved)

    assert load_config(config).mqtt.host == "hub2.local"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert "/etc/dslo-edge/device.toml" in second.changed
    assert second.warnings == []
    assert not (root / "etc/dslo-edge/device.toml.new").exists()
    assert not (root / "etc/dslo-edge/device.toml.bak").exists()
    assert verify_installation(root) == []


def test_copied_pending_config_removed_later(tmp_path: Path, pi4) -> None:
    bundle, root = flash_once(tmp_path, pi4)
    config = root / "etc/dslo-edge/device.toml"
    pending = root / "etc/dslo-edge/device.toml.new"
    config.write_text(config.read_text() + SECURITY_TABLE)
    moved = FlashOptions("kitchen-cam", broker_host="hub2.local", broker_port=8883)
    flash(bundle, pi4, root, moved)
    # The user takes the generated config by copying it, so both files stay.
    shutil.copyfile(pending, config)
    again = FlashOptions("kitchen-cam", broker_host="hub3.local", broker_port=8883)

    third = flash(bundle, pi4, root, again)

    assert load_config(config).mqtt.host == "hub3.local"
    assert not pending.exists()
    assert "/etc/dslo-edge/device.toml.new" in third.removed
    assert third.warnings == []


def test_edited_pending_config_backed_up(tmp_path: Path, pi4) -> None:
    bundle, root = flash_once(tmp_path, pi4)
    config = root / "etc/dslo-edge/device.toml"
    pending = root / "etc/dslo-edge/device.toml.new"
    config.write_text(config.read_text() + SECURITY_TABLE)
    moved = FlashOptions("kitchen-cam", broker_host="hub2.local", broker_port=8883)
    flash(bundle, pi4, root, moved)
    # The user merges the two configs in device.toml.new.
    pending.write_text(pending.read_text() + SECURITY_TABLE)
    merged = pending.read_bytes()
    again = FlashOptions("kitchen-cam", broker_host="hub3.local", broker_port=8883)

    third = flash(bundle, pi4, root, again)

    backup = root / "etc/dslo-edge/device.toml.new.bak"
    assert backup.read_bytes() == merged
    assert load_config(pending).mqtt.host == "hub3.local"
    assert len(third.warnings) == 2
    assert third.warnings[0] == (
        "replaced /etc/dslo-edge/device.toml.new, which differed from the config "
        "flash generated before; the previous file is kept as "
        "/etc/dslo-edge/device.toml.new.bak"
    )
    assert third.warnings[1].startswith("kept /etc/dslo-edge/device.toml")
    # A fourth run finds the generated text in device.toml.new: no new copy.
    fourth = flash(bundle, pi4, root, moved)
    assert len(fourth.warnings) == 1
    assert not (root / "etc/dslo-edge/device.toml.new.bak.1").exists()


def test_config_kept_without_generated_record(tmp_path: Path, pi4) -> None:
    bundle, root = flash_once(tmp_path, pi4)
    listing_path = root / "opt/dslo-edge/installed.json"
    listing = json.loads(listing_path.read_text())
    del listing["generated"]
    listing_path.write_text(json.dumps(listing))
    config = root / "etc/dslo-edge/device.toml"
    before = config.read_bytes()
    moved = FlashOptions("kitchen-cam", broker_host="hub2.local", broker_port=8883)

    second = flash(bundle, pi4, root, moved)

    assert config.read_bytes() == before
    assert load_config(root / "etc/dslo-edge/device.toml.new").mqtt.host == (
        "hub2.local"
    )
    assert len(second.warnings) == 1
    assert second.warnings[0].startswith("kept /etc/dslo-edge/device.toml")


def test_unedited_old_unit_replaced(tmp_path: Path, pi4, monkeypatch) -> None:
    monkeypatch.setattr(
        "dslo_edge.flash.render_unit", lambda: render_unit() + "# older version\n"
    )
    bundle, root = flash_once(tmp_path, pi4)
    monkeypatch.undo()

    second = flash(bundle, pi4, root, OPTIONS)

    unit = root / "etc/systemd/system/dslo-edge.service"
    assert unit.read_text() == render_unit()
    assert "/etc/systemd/system/dslo-edge.service" in second.changed
    assert second.warnings == []
    assert not (root / "etc/systemd/system/dslo-edge.service.bak").exists()


def test_flash_replace_config_keeps_backup(tmp_path: Path, pi4) -> None:
    bundle, root = flash_once(tmp_path, pi4)
    config = root / "etc/dslo-edge/device.toml"
    generated = config.read_bytes()
    config.write_text(config.read_text() + SECURITY_TABLE)
    config.chmod(0o600)
    edited = config.read_bytes()
    flash(bundle, pi4, root, OPTIONS)

    replaced = flash(bundle, pi4, root, OPTIONS, replace_config=True)

    backup = root / "etc/dslo-edge/device.toml.bak"
    assert config.read_bytes() == generated
    assert backup.read_bytes() == edited
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert not (root / "etc/dslo-edge/device.toml.new").exists()
    assert replaced.removed == ["/etc/dslo-edge/device.toml.new"]
    assert replaced.changed[:2] == [
        "/etc/dslo-edge/device.toml.bak",
        "/etc/dslo-edge/device.toml",
    ]
    assert replaced.warnings == [
        "replaced /etc/dslo-edge/device.toml; the previous file is kept as "
        "/etc/dslo-edge/device.toml.bak"
    ]

    config.write_text(config.read_text() + "# second edit\n")
    second_edit = config.read_bytes()
    flash(bundle, pi4, root, OPTIONS, replace_config=True)

    assert backup.read_bytes() == edited
    assert (root / "etc/dslo-edge/device.toml.bak.1").read_bytes() == second_edit
    assert config.read_bytes() == generated


def test_flash_replaces_edited_unit_with_backup(tmp_path: Path, pi4) -> None:
    bundle, root = flash_once(tmp_path, pi4)
    unit = root / "etc/systemd/system/dslo-edge.service"
    generated = unit.read_bytes()
    unit.write_text(unit.read_text().replace("RestartSec=10", "RestartSec=30"))
    edited = unit.read_bytes()

    replaced = flash(bundle, pi4, root, OPTIONS)
    again = flash(bundle, pi4, root, OPTIONS)

    backup = root / "etc/systemd/system/dslo-edge.service.bak"
    assert unit.read_bytes() == generated
    assert backup.read_bytes() == edited
    assert replaced.changed[:2] == [
        "/etc/systemd/system/dslo-edge.service.bak",
        "/etc/systemd/system/dslo-edge.service",
    ]
    assert replaced.warnings == [
        "replaced /etc/systemd/system/dslo-edge.service, which differed from the "
        "generated unit; the previous file is kept as "
        "/etc/systemd/system/dslo-edge.service.bak. Put local settings in a "
        "drop-in such as /etc/systemd/system/dslo-edge.service.d/local.conf, "
        "which flash does not change"
    ]
    assert again.changed == []
    assert again.warnings == []
    assert verify_installation(root) == []


def test_flash_writes_builtin_profile_name(tmp_path: Path, pi4) -> None:
    bundle, root = flash_once(tmp_path, pi4)

    config = load_config(root / "etc/dslo-edge/device.toml")

    assert config.profile == "raspberry-pi-4b"
    assert load_profile(config.profile).thermal_limit_c == 75.0
    assert not (root / "etc/dslo-edge/profiles").exists()


def test_flash_installs_custom_profile_file(tmp_path: Path, pi4) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    root = tmp_path / "rootfs"
    root.mkdir()
    custom = tmp_path / "shed-pi.toml"
    text = pi4.source.read_text()
    text = text.replace('name = "raspberry-pi-4b"', 'name = "shed-pi"')
    custom.write_text(text.replace("idle_watts = 2.7", "idle_watts = 3.1"))

    result = flash(bundle, load_profile(str(custom)), root, OPTIONS)

    config = load_config(root / "etc/dslo-edge/device.toml")
    assert config.profile == "/etc/dslo-edge/profiles/shed-pi.toml"
    copy = on_target(root, config.profile)
    assert copy.read_bytes() == custom.read_bytes()
    assert load_profile_file(copy).idle_watts == 3.1
    assert "/etc/dslo-edge/profiles/shed-pi.toml" in result.changed
    listing = json.loads((root / "opt/dslo-edge/installed.json").read_text())
    assert "/etc/dslo-edge/profiles/shed-pi.toml" in listing["files"]
    assert verify_installation(root) == []


def test_flash_backs_up_profile_edited_on_device(tmp_path: Path, pi4) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    root = tmp_path / "rootfs"
    root.mkdir()
    custom = tmp_path / "shed-pi.toml"
    text = pi4.source.read_text().replace(
        'name = "raspberry-pi-4b"', 'name = "shed-pi"'
    )
    custom.write_text(text)
    flash(bundle, load_profile(str(custom)), root, OPTIONS)
    copy = root / "etc/dslo-edge/profiles/shed-pi.toml"
    copy.write_text(text.replace("idle_watts = 2.7", "idle_watts = 3.3"))
    edited = copy.read_bytes()
    custom.write_text(text.replace("limit_c = 75.0", "limit_c = 70.0"))

    replaced = flash(bundle, load_profile(str(custom)), root, OPTIONS)
    again = flash(bundle, load_profile(str(custom)), root, OPTIONS)

    backup = root / "etc/dslo-edge/profiles/shed-pi.toml.bak"
    assert copy.read_bytes() == custom.read_bytes()
    assert backup.read_bytes() == edited
    assert replaced.warnings == [
        "replaced /etc/dslo-edge/profiles/shed-pi.toml, which differed from the "
        "profile file flash installed; the previous file is kept as "
        "/etc/dslo-edge/profiles/shed-pi.toml.bak. Make changes in the file "
        "given to --profile, so the next flash keeps them"
    ]
    assert again.changed == []
    assert again.warnings == []
    assert verify_installation(root) == []


def test_flash_replaces_unedited_profile_copy(tmp_path: Path, pi4) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    root = tmp_path / "rootfs"
    root.mkdir()
    custom = tmp_path / "shed-pi.toml"
    text = pi4.source.read_text().replace(
        'name = "raspberry-pi-4b"', 'name = "shed-pi"'
    )
    custom.write_text(text)
    flash(bundle, load_profile(str(custom)), root, OPTIONS)
    custom.write_text(text.replace("limit_c = 75.0", "limit_c = 70.0"))

    result = flash(bundle, load_profile(str(custom)), root, OPTIONS)

    copy = root / "etc/dslo-edge/profiles/shed-pi.toml"
    assert load_profile_file(copy).thermal_limit_c == 70.0
    assert result.warnings == []
    assert not (root / "etc/dslo-edge/profiles/shed-pi.toml.bak").exists()


def test_flashed_daemon_runs_with_profile(tmp_path: Path, pi4, mlp_pair) -> None:
    root = tmp_path / "rootfs"
    root.mkdir()
    flash(mlp_pair.bundle, pi4, root, OPTIONS)
    config = load_config(root / "etc/dslo-edge/device.toml")
    # The paths in the config are device paths, so point them into the target.
    config = dataclasses.replace(
        config,
        bundle=on_target(root, config.bundle),
        state_dir=on_target(root, config.state_dir),
    )

    daemon = EdgeDaemon(config)

    assert daemon.profile is not None
    assert daemon.profile.name == "raspberry-pi-4b"
    assert daemon.profile.thermal_limit_c == 75.0


def test_flashed_two_head_daemon_starts(tmp_path: Path, pi4, two_head_bundle) -> None:
    root = tmp_path / "rootfs"
    root.mkdir()
    result = flash(two_head_bundle, pi4, root, OPTIONS)
    config = load_config(root / "etc/dslo-edge/device.toml")
    config = dataclasses.replace(
        config,
        bundle=on_target(root, config.bundle),
        state_dir=on_target(root, config.state_dir),
    )

    daemon = EdgeDaemon(config)

    assert result.fit.fits
    assert verify_installation(root) == []
    assert daemon.bundle.heads == {"digit": 10, "shape": 3}


def test_flash_free_space_check_with_injected_usage(tmp_path: Path, pi4) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    root = tmp_path / "rootfs"
    root.mkdir()
    with pytest.raises(BundleError, match="not enough free space on .* 0.5 MiB free"):
        flash(bundle, pi4, root, OPTIONS, disk_usage=lambda _: Usage(1, 1, 512 * 1024))
    assert list(root.iterdir()) == []


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted for the test; skipped where mounting is not allowed."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_flash_full_disk_is_rejected(tmp_path: Path, small_filesystem: Path, pi4):
    bundle = write_bundle(tmp_path / "bundle", student_bytes=3 * 1024 * 1024)
    with pytest.raises(BundleError, match="not enough free space") as caught:
        flash(bundle, pi4, small_filesystem, OPTIONS)
    assert "MiB free" in str(caught.value)
    assert list(small_filesystem.iterdir()) == []


def test_flash_write_failure_keeps_previous_install(
    tmp_path: Path, small_filesystem: Path, pi4
) -> None:
    first = write_bundle(tmp_path / "first", student_bytes=100_000)
    flash(first, pi4, small_filesystem, OPTIONS)
    before = installed_files(small_filesystem)
    link_before = os.readlink(small_filesystem / "opt/dslo-edge/bundle")
    # A free-space figure that lies lets the copy start and run out of room.
    big = write_bundle(tmp_path / "big", student_bytes=3 * 1024 * 1024, seed=1)
    lying = lambda _: Usage(1 << 30, 0, 1 << 30)  # noqa: E731

    with pytest.raises(BundleError, match="No space left on device") as caught:
        flash(big, pi4, small_filesystem, OPTIONS, disk_usage=lying)

    assert "previous installation is unchanged" in str(caught.value)
    assert installed_files(small_filesystem) == before
    assert os.readlink(small_filesystem / "opt/dslo-edge/bundle") == link_before
    leftovers = list((small_filesystem / "opt/dslo-edge/releases").glob(".staging-*"))
    assert leftovers == []
    assert verify_installation(small_filesystem) == []


@pytest.mark.parametrize(
    ("blocker", "kind", "message"),
    [
        ("var/lib/dslo-edge", "file", "is not a directory (a file, or a symlink"),
        ("etc/systemd/system", "file", "but flash needs one there for"),
        ("etc/dslo-edge/device.toml", "directory", "is a directory, but flash"),
        ("opt/dslo-edge/bundle", "directory", "writes /opt/dslo-edge/bundle there"),
        ("opt/dslo-edge/installed.json", "directory", "as a file or symlink"),
    ],
)
def test_flash_checks_path_types_first(
    tmp_path: Path, pi4, blocker: str, kind: str, message: str
) -> None:
    _, root = flash_once(tmp_path, pi4)
    path = root / blocker
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
    if kind == "file":
        path.write_text("a file where flash needs a directory\n")
    else:
        path.mkdir()
    before = installed_files(root)
    links_before = symlinks_under(root)
    second = write_bundle(tmp_path / "second", seed=1)

    with pytest.raises(BundleError) as caught:
        flash(second, pi4, root, OPTIONS)

    assert str(caught.value).startswith(str(path))
    assert message in str(caught.value)
    assert str(caught.value).endswith("and run flash again")
    # Nothing was written: no new release, link or config.
    assert installed_files(root) == before
    assert symlinks_under(root) == links_before


def test_flash_failure_names_written_paths(tmp_path: Path, pi4) -> None:
    _, root = flash_once(tmp_path, pi4)
    # A directory at the temporary name makes writing the file list fail.
    (root / "opt/dslo-edge/.installed.json.tmp").mkdir()
    second = write_bundle(tmp_path / "second", seed=1)
    release = release_id(load_bundle(second))

    with pytest.raises(BundleError) as caught:
        flash(second, pi4, root, OPTIONS)

    message = str(caught.value)
    assert "previous installation is unchanged" not in message
    assert (
        f"after writing /opt/dslo-edge/releases/{release}, /opt/dslo-edge/bundle; "
        "fix the cause and run flash again to finish the installation"
    ) in message
    assert os.readlink(root / "opt/dslo-edge/bundle") == f"releases/{release}"


def test_unit_has_restart_and_sandbox_settings() -> None:
    unit = render_unit(user="dslo")
    lines = set(unit.splitlines())
    for expected in (
        "Type=notify",
        "WatchdogSec=60",
        "NotifyAccess=main",
        "Restart=on-failure",
        "RestartSec=10",
        "StartLimitBurst=5",
        "StartLimitIntervalSec=600",
        "After=network-online.target",
        "Wants=network-online.target",
        "RestartPreventExitStatus=78",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/dslo-edge",
        "User=dslo",
        "WantedBy=multi-user.target",
    ):
        assert expected in lines, expected
    assert UNIT_EXIT_CONFIG == EXIT_CONFIG


def test_unit_runs_as_root_by_default() -> None:
    assert "User=" not in render_unit()
