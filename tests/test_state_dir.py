"""One daemon per state directory, and checkpoints that name their device."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from dslo_edge.checkpoint import (
    Checkpoint,
    list_checkpoints,
    load_latest_checkpoint,
    load_older_checkpoint,
    move_generations,
    save_checkpoint,
)
from dslo_edge.config import load_config, render_config
from dslo_edge.daemon import EdgeDaemon
from dslo_edge.dropped_ids import DROPPED_IDS_RESERVE_FILE
from dslo_edge.errors import ConfigError
from dslo_edge.lru_rows import pack_ids
from dslo_edge.multihead_model import load_student
from dslo_edge.state_lock import StateLock
from dslo_edge.swap import KEPT_CHECKPOINTS, release_id
from dslo_edge.trainer import WEIGHT_PREFIX
from tests.cli_process import run_cli


def device_config(tmp_path: Path, bundle: Path, device_id: str, state: Path):
    path = tmp_path / f"{device_id}.toml"
    # Port 9 is never contacted, because no test here connects: the one
    # start() call raises before it reaches the broker.
    path.write_text(render_config(device_id, bundle, state, 9))
    return load_config(path)


def test_second_daemon_on_state_dir_is_rejected(mlp_pair, tmp_path) -> None:
    state = tmp_path / "state"
    first = EdgeDaemon(device_config(tmp_path, mlp_pair.bundle, "dev-a", state))

    with pytest.raises(ConfigError) as caught:
        EdgeDaemon(device_config(tmp_path, mlp_pair.bundle, "dev-b", state))

    message = str(caught.value)
    assert "is in use by another dslo-edge daemon" in message
    assert "device dev-a" in message
    assert "give each device its own state_dir" in message
    first._state_lock.release()
    # Once the first daemon lets go, the directory can be used again.
    EdgeDaemon(device_config(tmp_path, mlp_pair.bundle, "dev-b", state))


def test_daemon_on_demo_state_names_demo(mlp_pair, tmp_path) -> None:
    state = tmp_path / "state"
    config = tmp_path / "device.toml"
    config.write_text(render_config("demo-device", mlp_pair.bundle, state, 9))
    demo = StateLock(state, "demo-device", for_demo=True)
    try:
        result = run_cli("run", "--config", str(config))
    finally:
        demo.release()

    assert result.returncode == 78, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"error: device.state_dir {state} is in use by a running dslo-edge demo "
        f"(pid {os.getpid()}, device demo-device, dslo-edge demo), which replaces "
        "the bundle and checkpoints there and then starts its own daemon. Start "
        "this daemon after the demo ends"
    )


def test_state_dir_that_is_a_file_is_rejected(mlp_pair, tmp_path) -> None:
    state = tmp_path / "state"
    state.write_text("not a folder")

    with pytest.raises(ConfigError) as caught:
        EdgeDaemon(device_config(tmp_path, mlp_pair.bundle, "dev-a", state))

    assert "is a file, expected a directory" in str(caught.value)
    assert state.read_text() == "not a folder"


def test_state_dir_under_a_file_names_it(mlp_pair, tmp_path) -> None:
    blocker = tmp_path / "device.toml.bak"
    blocker.write_text("not a folder")
    state = blocker / "state" / "porch"

    with pytest.raises(ConfigError) as caught:
        EdgeDaemon(device_config(tmp_path, mlp_pair.bundle, "dev-a", state))

    assert str(caught.value) == (
        f"device.state_dir {state} is under the file {blocker}, expected a "
        "directory; point state_dir at a folder for this device's checkpoints"
    )
    assert blocker.read_text() == "not a folder"


def test_checkpoints_path_that_is_a_file(mlp_pair, tmp_path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "checkpoints").write_text("not a folder")
    daemon = EdgeDaemon(device_config(tmp_path, mlp_pair.bundle, "dev-a", state))

    with pytest.raises(ConfigError) as caught:
        daemon._restore()
    daemon._state_lock.release()

    assert "checkpoints in device.state_dir is a file" in str(caught.value)
    assert (state / "checkpoints").read_text() == "not a folder"


@pytest.mark.parametrize("link_target", ["checkpoints", "missing-folder"])
def test_checkpoints_link_to_nowhere(mlp_pair, tmp_path, link_target) -> None:
    state = tmp_path / "state"
    state.mkdir()
    # A loop, or a link whose target does not exist: saves could never work.
    (state / "checkpoints").symlink_to(link_target)
    daemon = EdgeDaemon(device_config(tmp_path, mlp_pair.bundle, "dev-a", state))

    with pytest.raises(ConfigError) as caught:
        daemon._restore()
    daemon._state_lock.release()

    message = str(caught.value)
    assert f"{state / 'checkpoints'} in device.state_dir is a symlink" in message
    assert "that leads to no directory" in message
    assert "remove the symlink or point it at a directory" in message
    assert os.readlink(state / "checkpoints") == link_target


@pytest.mark.parametrize(
    ("folder", "role"),
    [
        ("bundles", "the folder of over-the-air releases"),
        ("ota", "the folder of incoming over-the-air transfers"),
        ("kept-checkpoints", "the folder of checkpoints kept across model changes"),
    ],
)
def test_ota_folder_that_is_a_file(mlp_pair, tmp_path, folder, role) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / folder).write_text("not a folder")
    config = device_config(tmp_path, mlp_pair.bundle, "dev-a", state)

    with pytest.raises(ConfigError) as caught:
        EdgeDaemon(config)

    assert str(caught.value) == (
        f"{config.source}: {state / folder} in device.state_dir is a file, "
        f"expected {role}; move the file away"
    )
    assert (state / folder).read_text() == "not a folder"
    # The daemon released its lock, so a corrected start can take it.
    (state / folder).unlink()
    EdgeDaemon(config)._state_lock.release()


def test_bundles_link_to_nowhere(mlp_pair, tmp_path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "bundles").symlink_to("bundles")

    with pytest.raises(ConfigError) as caught:
        EdgeDaemon(device_config(tmp_path, mlp_pair.bundle, "dev-a", state))

    message = str(caught.value)
    assert f"{state / 'bundles'} in device.state_dir is a symlink" in message
    assert "expected the folder of over-the-air releases" in message
    assert "remove the symlink or point it at a directory" in message


def test_lock_file_that_is_a_directory(mlp_pair, tmp_path) -> None:
    state = tmp_path / "state"
    (state / ".lock").mkdir(parents=True)

    with pytest.raises(ConfigError) as caught:
        EdgeDaemon(device_config(tmp_path, mlp_pair.bundle, "dev-a", state))

    assert str(caught.value) == (
        f"{state / '.lock'} is a directory, expected the daemon's lock file; "
        "move it out of device.state_dir"
    )
    assert (state / ".lock").is_dir()


def test_read_only_lock_file_stops_daemon(mlp_pair, tmp_path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    lock = state / ".lock"
    lock.write_text("pid 1, device dev-a\n")
    lock.chmod(0o444)
    config = tmp_path / "device.toml"
    config.write_text(render_config("dev-a", mlp_pair.bundle, state, 9))

    result = subprocess.run(
        [
            *file_permissions_apply(),
            sys.executable,
            "-m",
            "dslo_edge.cli",
            "run",
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 78, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"error: cannot open the lock file {lock} in device.state_dir: "
        f"Permission denied; give the daemon's user write access to {state} "
        "and the files in it, for example with chown -R"
    )


def test_lock_is_released_when_holder_dies(tmp_path) -> None:
    state = tmp_path / "state"
    code = (
        "import os, sys; from pathlib import Path; "
        "from dslo_edge.state_lock import StateLock; "
        f"StateLock(Path({str(state)!r}), 'dev-a'); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

    lock = StateLock(state, "dev-b")

    assert (state / ".lock").read_text().endswith("device dev-b\n")
    lock.release()


def test_checkpoint_of_other_device_is_rejected(mlp_pair, tmp_path) -> None:
    state = tmp_path / "state"
    owner = EdgeDaemon(device_config(tmp_path, mlp_pair.bundle, "dev-a", state))
    assert owner.save_checkpoint()
    owner._state_lock.release()
    saved = sorted((state / "checkpoints").iterdir())

    other = EdgeDaemon(device_config(tmp_path, mlp_pair.bundle, "dev-b", state))
    with pytest.raises(ConfigError) as caught:
        other.start()

    message = str(caught.value)
    assert "holds checkpoints of device 'dev-a'" in message
    assert "this config is for 'dev-b'" in message
    assert sorted((state / "checkpoints").iterdir()) == saved
    # start released the lock when it raised.
    StateLock(state, "dev-c").release()


def test_unreadable_checkpoints_log_a_warning(mlp_pair, tmp_path, caplog) -> None:
    state = tmp_path / "state"
    writer = EdgeDaemon(device_config(tmp_path, mlp_pair.bundle, "dev-a", state))
    assert writer.save_checkpoint()
    assert writer.save_checkpoint()
    writer._state_lock.release()
    for path in (state / "checkpoints").iterdir():
        path.write_bytes(b"damaged")

    daemon = EdgeDaemon(device_config(tmp_path, mlp_pair.bundle, "dev-a", state))
    with caplog.at_level(logging.WARNING, logger="dslo_edge.daemon"):
        daemon._restore()
    daemon._state_lock.release()

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("could read none of its 2 checkpoints" in w for w in warnings)


def test_run_with_bundles_file_exits_78(mlp_pair, tmp_path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "bundles").write_text("not a folder")
    config = tmp_path / "device.toml"
    config.write_text(render_config("dev-a", mlp_pair.bundle, state, 9))

    result = run_cli("run", "--config", str(config))

    assert result.returncode == 78
    assert (
        f"{state / 'bundles'} in device.state_dir is a file, expected the folder "
        "of over-the-air releases; move the file away" in result.stderr
    )
    assert "Traceback" not in result.stderr


def test_run_with_state_dir_file_exits_78(mlp_pair, tmp_path) -> None:
    state = tmp_path / "state"
    state.write_text("not a folder")
    config = tmp_path / "device.toml"
    config.write_text(render_config("dev-a", mlp_pair.bundle, state, 9))

    result = run_cli("run", "--config", str(config))

    assert result.returncode == 78
    assert "is a file, expected a directory" in result.stderr
    assert "Traceback" not in result.stderr


def adapted_weights(tensors: dict, offset: float) -> dict:
    """Return ``tensors`` with ``offset`` added to every weight, unlike the bundle."""
    return {
        name: value + offset if name.startswith(WEIGHT_PREFIX) else value
        for name, value in tensors.items()
    }


def restore_then_save(tmp_path: Path, bundle: Path, state: Path) -> EdgeDaemon:
    """Restore a daemon from ``state``, save one checkpoint and return it."""
    daemon = EdgeDaemon(device_config(tmp_path, bundle, "dev-a", state))
    daemon._restore()
    assert daemon.save_checkpoint()
    daemon._state_lock.release()
    return daemon


def forced_rollback(daemon: EdgeDaemon, monkeypatch, caplog) -> bool:
    """Run the health check with a forced failure, then release the state lock."""
    monkeypatch.setattr(daemon.health, "problem", lambda *_: "forced failure")
    with caplog.at_level(logging.WARNING, logger="dslo_edge.daemon"):
        healthy = daemon._check_health()
    daemon._state_lock.release()
    return healthy


def generation_names(folder: Path) -> list[str]:
    return [path.name for _, path in list_checkpoints(folder)]


def daemon_and_first_checkpoint(
    tmp_path: Path, bundle: Path, state: Path
) -> tuple[EdgeDaemon, Checkpoint]:
    """Return a daemon and its first checkpoint, whose file is removed.

    The daemon keeps its state lock, so the test releases it.
    """
    daemon = EdgeDaemon(device_config(tmp_path, bundle, "dev-a", state))
    assert daemon.save_checkpoint()
    written = load_latest_checkpoint(state / "checkpoints")
    assert written is not None
    written.path.unlink()
    return daemon, written


def take_first_checkpoint(tmp_path: Path, bundle: Path, state: Path):
    """Save a daemon's first checkpoint, then remove the file and return it."""
    writer = EdgeDaemon(device_config(tmp_path, bundle, "dev-a", state))
    assert writer.save_checkpoint()
    writer._state_lock.release()
    written = load_latest_checkpoint(state / "checkpoints")
    assert written is not None
    written.path.unlink()
    return written


def test_checkpoints_of_other_model_are_kept(mlp_pair, tmp_path, caplog) -> None:
    state = tmp_path / "state"
    folder = state / "checkpoints"
    written = take_first_checkpoint(tmp_path, mlp_pair.bundle, state)
    # The same state under other weight names: a checkpoint of another model.
    renamed = {
        name.replace(WEIGHT_PREFIX, f"{WEIGHT_PREFIX}other_", 1): value
        for name, value in written.tensors.items()
    }
    save_checkpoint(folder, renamed, written.state)
    save_checkpoint(folder, renamed, written.state)
    other_model = {
        path.name: path.read_bytes()
        for path in folder.iterdir()
        if path.name != DROPPED_IDS_RESERVE_FILE
    }

    daemon = EdgeDaemon(device_config(tmp_path, mlp_pair.bundle, "dev-a", state))
    with caplog.at_level(logging.WARNING, logger="dslo_edge.daemon"):
        daemon._restore()
    # More saves than the two generations kept, so pruning runs.
    for _ in range(3):
        assert daemon.save_checkpoint()
    daemon._state_lock.release()

    moved_files = list((state / "mismatched-checkpoints").glob("*/*"))
    assert {path.name: path.read_bytes() for path in moved_files} == other_model
    assert len(list_checkpoints(folder)) == 2
    moved_to = moved_files[0].parent
    assert f"moved the checkpoints it cannot load to {moved_to}" in caplog.text


def test_lowered_capacity_keeps_newest_ids(mlp_pair, tmp_path, caplog) -> None:
    state = tmp_path / "state"
    folder = state / "checkpoints"
    written = take_first_checkpoint(tmp_path, mlp_pair.bundle, state)
    # A checkpoint of this model with adapted weights and three smoothing ids,
    # saved oldest first without stamps, with row i filled with i.
    tensors = adapted_weights(written.tensors, 1.0)
    tensors["smoothing/rows"] = np.repeat(np.arange(3, dtype=np.float32), 10)
    tensors["smoothing/rows"] = tensors["smoothing/rows"].reshape(3, 10)
    state_values = {**written.state, "smoothing_ids": ["a", "b", "c"]}
    save_checkpoint(folder, tensors, state_values)
    path = tmp_path / "lowered.toml"
    overrides = {"smoothing": {"capacity": 2}}
    path.write_text(
        render_config("dev-a", mlp_pair.bundle, state, 9, overrides=overrides)
    )

    daemon = EdgeDaemon(load_config(path))
    with caplog.at_level(logging.WARNING, logger="dslo_edge.dynamic"):
        daemon._restore()
    daemon._state_lock.release()

    ids, rows = daemon.trainer.engine.store.to_arrays()
    assert ids == ["b", "c"]
    np.testing.assert_array_equal(rows[:, 0], [1.0, 2.0])
    for name, value in daemon.student.get_weights().items():
        np.testing.assert_array_equal(value, tensors[WEIGHT_PREFIX + name])
    assert not (state / "mismatched-checkpoints").exists()
    assert (
        "smoothing table has 3 ids, more than the smoothing capacity 2" in caplog.text
    )
    assert "dropping 1" in caplog.text


def test_checkpoint_with_invalid_ids_is_kept(mlp_pair, tmp_path, caplog) -> None:
    state = tmp_path / "state"
    folder = state / "checkpoints"
    written = take_first_checkpoint(tmp_path, mlp_pair.bundle, state)
    # Two packed smoothing ids whose count in the JSON state is null.
    tensors = {
        **written.tensors,
        "smoothing/rows": np.zeros((2, 10), np.float32),
        "smoothing/stamps": np.arange(2, dtype=np.int64),
        "smoothing/ids": np.frombuffer(b"a\x00b", np.uint8).copy(),
    }
    save_checkpoint(folder, tensors, {**written.state, "smoothing_id_count": None})

    daemon = EdgeDaemon(device_config(tmp_path, mlp_pair.bundle, "dev-a", state))
    with caplog.at_level(logging.WARNING, logger="dslo_edge.daemon"):
        daemon._restore()
    daemon._state_lock.release()

    assert len(list((state / "mismatched-checkpoints").glob("*/*"))) == 1
    assert len(daemon.trainer.engine.store) == 0
    assert "invalid smoothing_id_count None" in caplog.text


@pytest.mark.parametrize(
    ("state_change", "logged"),
    [
        ({"smoothing_id_count": 3}, "expected 3 packed ids, found 2"),
        (
            {"applied_updates": [1, 2]},
            "invalid state in checkpoint-00000002.safetensors (TypeError",
        ),
        (
            {"monitor_state": [0.5]},
            "invalid state in checkpoint-00000002.safetensors",
        ),
    ],
)
def test_unrestorable_newest_falls_back_a_generation(
    mlp_pair, tmp_path, caplog, state_change, logged
) -> None:
    state = tmp_path / "state"
    folder = state / "checkpoints"
    written = take_first_checkpoint(tmp_path, mlp_pair.bundle, state)
    adapted = adapted_weights(written.tensors, 0.5)
    save_checkpoint(folder, adapted, written.state)
    # Checksummed, so it reads back intact, but it does not restore.
    broken = {
        **adapted,
        "smoothing/rows": np.zeros((2, 10), np.float32),
        "smoothing/stamps": np.arange(2),
        "smoothing/ids": pack_ids(["a", "b"]),
    }
    broken_state = {**written.state, "smoothing_id_count": 2, **state_change}
    newest = save_checkpoint(folder, broken, broken_state)
    broken_bytes = newest.read_bytes()

    daemon = EdgeDaemon(device_config(tmp_path, mlp_pair.bundle, "dev-a", state))
    with caplog.at_level(logging.WARNING, logger="dslo_edge.daemon"):
        daemon._restore()
    daemon._state_lock.release()

    assert daemon.restored_from == "checkpoint-00000001.safetensors"
    for name, value in daemon.student.get_weights().items():
        np.testing.assert_array_equal(value, adapted[WEIGHT_PREFIX + name])
    moved = list((state / "mismatched-checkpoints").glob("*/*"))
    assert [path.name for path in moved] == ["checkpoint-00000002.safetensors"]
    assert moved[0].read_bytes() == broken_bytes
    assert generation_names(folder) == ["checkpoint-00000001.safetensors"]
    assert (
        "cannot restore its newest checkpoint checkpoint-00000002.safetensors"
        in caplog.text
    )
    assert logged in caplog.text


# Two packed smoothing ids without their count in the state.
IDS_WITHOUT_COUNT = {
    "smoothing/rows": np.zeros((2, 10), np.float32),
    "smoothing/stamps": np.arange(2, dtype=np.int64),
    "smoothing/ids": np.frombuffer(b"a\x00b", np.uint8).copy(),
}


@pytest.mark.parametrize(
    ("extra_tensors", "state_change", "logged"),
    [
        (IDS_WITHOUT_COUNT, {}, "missing smoothing_id_count"),
        (
            {},
            {"highest_round": {"round": 3}},
            "invalid state in checkpoint-00000001.safetensors",
        ),
    ],
)
def test_unrestorable_kept_checkpoint_resets_weights(
    mlp_pair, tmp_path, caplog, extra_tensors, state_change, logged
) -> None:
    state = tmp_path / "state"
    written = take_first_checkpoint(tmp_path, mlp_pair.bundle, state)
    daemon = EdgeDaemon(device_config(tmp_path, mlp_pair.bundle, "dev-a", state))
    tensors = {**adapted_weights(written.tensors, 1.0), **extra_tensors}
    kept = state / KEPT_CHECKPOINTS / release_id(daemon.bundle.path)
    save_checkpoint(kept, tensors, {**written.state, **state_change})
    student = load_student(daemon.bundle, daemon.config.runtime)
    loaded = student.get_weights()

    with caplog.at_level(logging.WARNING, logger="dslo_edge.daemon"):
        trainer, restored = daemon._restore_kept_checkpoint(
            daemon.bundle, daemon._new_trainer(student)
        )
    daemon._state_lock.release()

    assert not restored
    assert trainer.student is student
    assert len(trainer.engine.store) == 0
    # The adapted weights may have loaded before the restore failed, and
    # were reset.
    for name, value in student.get_weights().items():
        np.testing.assert_array_equal(value, loaded[name])
    assert logged in caplog.text


def test_rollback_to_empty_store_clears_it(mlp_pair, tmp_path, monkeypatch) -> None:
    state = tmp_path / "state"
    daemon = EdgeDaemon(device_config(tmp_path, mlp_pair.bundle, "dev-a", state))
    # A checkpoint saved before any update has an empty smoothing store.
    assert daemon.save_checkpoint()
    engine = daemon.trainer.engine
    engine.prepare(["a", "b"], np.full((2, 10), 0.1, np.float32), 1)
    engine.finish_update()
    monkeypatch.setattr(daemon.health, "problem", lambda *_: "forced failure")

    healthy = daemon._check_health()
    daemon._state_lock.release()

    assert not healthy
    assert daemon.rollbacks == 1
    # The rows of the dropped update are gone with it.
    assert len(daemon.trainer.engine.store) == 0
    assert len(daemon.trainer.engine.monitor.state()[1]) == 0


def test_rollback_to_unloadable_checkpoint_resets(
    mlp_pair, tmp_path, monkeypatch, caplog
) -> None:
    state = tmp_path / "state"
    folder = state / "checkpoints"
    daemon, written = daemon_and_first_checkpoint(tmp_path, mlp_pair.bundle, state)
    factory = daemon.student.get_weights()
    # Two generations with adapted weights, and packed ids that do not match
    # their count.
    adapted = adapted_weights(written.tensors, 1.0)
    save_checkpoint(folder, *unrestorable(adapted, written.state))
    save_checkpoint(folder, *unrestorable(adapted, written.state))

    healthy = forced_rollback(daemon, monkeypatch, caplog)

    assert not healthy
    assert daemon.rollbacks == 1
    for name, value in daemon.student.get_weights().items():
        np.testing.assert_array_equal(value, factory[name])
    assert "expected 3 packed ids, found 2" in caplog.text
    assert "rolled back to the factory weights: forced failure" in caplog.text
    # Both generations are kept out of reach of the next saves' pruning.
    assert len(list((state / "mismatched-checkpoints").glob("*/*"))) == 2
    assert list_checkpoints(folder) == []


def rewrite_metadata(path: Path, change: dict[str, str | None]) -> None:
    """Write ``path`` again with its tensors and changed metadata entries."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path)
    with safe_open(path, framework="numpy") as opened:
        metadata = dict(opened.metadata())
    metadata.update(change)
    kept = {key: value for key, value in metadata.items() if value is not None}
    save_file(tensors, path, metadata=kept)


def file_permissions_apply() -> list[str]:
    """Return a command prefix under which file permissions apply, also to root."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("root ignores file permissions and setpriv is missing")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--"]


def test_unreadable_checkpoint_stops_daemon(mlp_pair, tmp_path) -> None:
    state = tmp_path / "state"
    writer = EdgeDaemon(device_config(tmp_path, mlp_pair.bundle, "dev-a", state))
    assert writer.save_checkpoint()
    assert writer.save_checkpoint()
    writer._state_lock.release()
    folder = state / "checkpoints"
    newest = folder / "checkpoint-00000002.safetensors"
    saved = {path.name: path.read_bytes() for path in folder.iterdir()}
    newest.chmod(0)
    config = tmp_path / "device.toml"
    config.write_text(render_config("dev-a", mlp_pair.bundle, state, 9))

    result = subprocess.run(
        [
            *file_permissions_apply(),
            sys.executable,
            "-m",
            "dslo_edge.cli",
            "run",
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 78, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"error: {config}: the daemon's user may not read {newest.name} in "
        f"{folder} (permission denied); give that user read and write access "
        f"to device.state_dir {state}, for example with chown -R, or run the "
        "daemon as the user that wrote the checkpoints"
    )
    # Not renamed to *.corrupt: both generations stay as they were.
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == saved


def test_unreadable_checkpoints_folder_stops_daemon(mlp_pair, tmp_path) -> None:
    state = tmp_path / "state"
    writer = EdgeDaemon(device_config(tmp_path, mlp_pair.bundle, "dev-a", state))
    assert writer.save_checkpoint()
    writer._state_lock.release()
    folder = state / "checkpoints"
    saved = {path.name: path.read_bytes() for path in folder.iterdir()}
    folder.chmod(0)
    config = tmp_path / "device.toml"
    config.write_text(render_config("dev-a", mlp_pair.bundle, state, 9))

    try:
        result = subprocess.run(
            [
                *file_permissions_apply(),
                sys.executable,
                "-m",
                "dslo_edge.cli",
                "run",
                "--config",
                str(config),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        folder.chmod(0o755)

    assert result.returncode == 78, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"error: {config}: the daemon's user may not list the checkpoints folder "
        f"{folder} (permission denied); give that user read and write access "
        f"to device.state_dir {state}, for example with chown -R, or run the "
        "daemon as the user that wrote the checkpoints"
    )
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == saved


def test_non_file_checkpoint_is_quarantined(mlp_pair, tmp_path) -> None:
    state = tmp_path / "state"
    writer = EdgeDaemon(device_config(tmp_path, mlp_pair.bundle, "dev-a", state))
    assert writer.save_checkpoint()
    assert writer.save_checkpoint()
    writer._state_lock.release()
    folder = state / "checkpoints"
    (folder / "checkpoint-00000003.safetensors").symlink_to(tmp_path / "missing")
    (folder / "checkpoint-00000004.safetensors").mkdir()
    daemon = EdgeDaemon(device_config(tmp_path, mlp_pair.bundle, "dev-a", state))

    try:
        daemon._restore()
    finally:
        daemon._state_lock.release()

    # Damaged, not a permission problem: both are renamed and 2 is restored.
    assert daemon.restored_from == "checkpoint-00000002.safetensors"
    assert sorted(path.name for path in folder.iterdir()) == [
        "checkpoint-00000001.safetensors",
        "checkpoint-00000002.safetensors",
        "checkpoint-00000003.safetensors.corrupt",
        "checkpoint-00000004.safetensors.corrupt",
        DROPPED_IDS_RESERVE_FILE,
    ]


def test_fifo_checkpoint_does_not_block_start(mlp_pair, tmp_path) -> None:
    state = tmp_path / "state"
    writer = EdgeDaemon(device_config(tmp_path, mlp_pair.bundle, "dev-a", state))
    assert writer.save_checkpoint()
    writer._state_lock.release()
    folder = state / "checkpoints"
    fifo = folder / "checkpoint-00000002.safetensors"
    os.mkfifo(fifo)
    daemon = EdgeDaemon(device_config(tmp_path, mlp_pair.bundle, "dev-a", state))
    restore = threading.Thread(target=daemon._restore, daemon=True)

    restore.start()
    restore.join(30)
    blocked = restore.is_alive()
    if blocked:
        # Opening the FIFO for writing releases the reader that waits on it.
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        restore.join(60)
    daemon._state_lock.release()

    assert not blocked
    assert daemon.restored_from == "checkpoint-00000001.safetensors"
    assert sorted(path.name for path in folder.iterdir()) == [
        "checkpoint-00000001.safetensors",
        "checkpoint-00000002.safetensors.corrupt",
        DROPPED_IDS_RESERVE_FILE,
    ]


def test_edited_state_falls_back_a_generation(tmp_path) -> None:
    folder = tmp_path / "checkpoints"
    save_checkpoint(folder, {"w": np.zeros(2, np.float32)}, {"run": 1})
    newest = save_checkpoint(folder, {"w": np.ones(2, np.float32)}, {"run": 2})
    # Valid JSON with another value, as a flipped bit in a digit would give.
    rewrite_metadata(newest, {"state": '{"run": 3}'})

    restored = load_latest_checkpoint(folder, quarantine=True)

    assert restored is not None
    assert restored.state == {"run": 1}
    assert newest.with_name(newest.name + ".corrupt").exists()


def test_state_without_checksum_still_loads(tmp_path) -> None:
    folder = tmp_path / "checkpoints"
    written = save_checkpoint(folder, {"w": np.ones(2, np.float32)}, {"run": 1})
    # Earlier versions wrote no checksum of the state.
    rewrite_metadata(written, {"state_sha256": None})

    restored = load_latest_checkpoint(folder)

    assert restored is not None
    assert restored.state == {"run": 1}


def test_moved_generations_never_replace_earlier(tmp_path) -> None:
    folder = tmp_path / "checkpoints"
    destination = tmp_path / "moved"
    save_checkpoint(folder, {"w": np.zeros(2, np.float32)}, {"run": 1})
    first = move_generations(folder, destination)
    # Numbering starts again at 1, so the second move has the same file name.
    save_checkpoint(folder, {"w": np.ones(2, np.float32)}, {"run": 2})
    second = move_generations(folder, destination)

    name = "checkpoint-00000001.safetensors"
    assert first is not None
    assert second is not None
    assert first != second
    assert [path.name for path in first.iterdir()] == [name]
    assert [path.name for path in second.iterdir()] == [name]
    assert load_latest_checkpoint(first).state == {"run": 1}
    assert load_latest_checkpoint(second).state == {"run": 2}
    assert list_checkpoints(folder) == []
    assert move_generations(folder, destination) is None


def test_quarantine_keeps_earlier_corrupt_file(tmp_path) -> None:
    folder = tmp_path / "checkpoints"
    save_checkpoint(folder, {"w": np.zeros(2, np.float32)}, {"run": 1})
    newest = save_checkpoint(folder, {"w": np.ones(2, np.float32)}, {"run": 2})
    rewrite_metadata(newest, {"state": '{"run": 3}'})
    load_latest_checkpoint(folder, quarantine=True)
    # The daemon saves the next generation under the quarantined number.
    again = save_checkpoint(folder, {"w": np.ones(2, np.float32)}, {"run": 4})
    rewrite_metadata(again, {"state": '{"run": 5}'})

    restored = load_latest_checkpoint(folder, quarantine=True)

    first = newest.with_name(newest.name + ".corrupt")
    second = newest.with_name(newest.name + ".corrupt-2")
    assert again == newest
    assert restored is not None
    assert restored.state == {"run": 1}
    assert saved_state(first) == '{"run": 3}'
    assert saved_state(second) == '{"run": 5}'


def saved_state(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as opened:
        return opened.metadata()["state"]


def unrestorable(tensors: dict, state: dict) -> tuple[dict, dict]:
    """Return checkpoint content that reads back intact but fails to restore."""
    # Two packed smoothing ids, but the JSON state counts three.
    broken = {
        **tensors,
        "smoothing/rows": np.zeros((2, 10), np.float32),
        "smoothing/stamps": np.arange(2),
        "smoothing/ids": pack_ids(["a", "b"]),
    }
    return broken, {**state, "smoothing_id_count": 3}


def test_unreadable_older_generation_is_quarantined(mlp_pair, tmp_path) -> None:
    state = tmp_path / "state"
    folder = state / "checkpoints"
    written = take_first_checkpoint(tmp_path, mlp_pair.bundle, state)
    adapted = adapted_weights(written.tensors, 0.5)
    save_checkpoint(folder, adapted, written.state, keep=3)
    damaged = save_checkpoint(folder, adapted, written.state, keep=3)
    damaged.write_bytes(b"damaged")
    # Three generations, as a crash between a save and its pruning leaves.
    save_checkpoint(folder, *unrestorable(adapted, written.state), keep=3)

    daemon = restore_then_save(tmp_path, mlp_pair.bundle, state)

    assert daemon.restored_from == "checkpoint-00000001.safetensors"
    # The restored generation survives the next save's pruning.
    assert generation_names(folder) == [
        "checkpoint-00000002.safetensors",
        "checkpoint-00000001.safetensors",
    ]
    assert damaged.with_name(damaged.name + ".corrupt").read_bytes() == b"damaged"


def test_unmovable_newest_stops_counting(mlp_pair, tmp_path, caplog) -> None:
    state = tmp_path / "state"
    folder = state / "checkpoints"
    written = take_first_checkpoint(tmp_path, mlp_pair.bundle, state)
    adapted = adapted_weights(written.tensors, 0.5)
    save_checkpoint(folder, adapted, written.state)
    newest = save_checkpoint(folder, *unrestorable(adapted, written.state))
    broken_bytes = newest.read_bytes()
    # A file where the folder for moved checkpoints goes, so the move fails.
    (state / "mismatched-checkpoints").write_text("")

    with caplog.at_level(logging.WARNING, logger="dslo_edge.daemon"):
        daemon = restore_then_save(tmp_path, mlp_pair.bundle, state)

    assert daemon.restored_from == "checkpoint-00000001.safetensors"
    # The restored generation survives the next save's pruning.
    assert generation_names(folder) == [
        "checkpoint-00000002.safetensors",
        "checkpoint-00000001.safetensors",
    ]
    renamed = folder / "checkpoint-00000002.safetensors.mismatched"
    assert renamed.read_bytes() == broken_bytes
    assert f"renamed the newest to {renamed.name}" in caplog.text


def test_unrestorable_older_is_logged(mlp_pair, tmp_path, caplog) -> None:
    state = tmp_path / "state"
    folder = state / "checkpoints"
    written = take_first_checkpoint(tmp_path, mlp_pair.bundle, state)
    older_tensors = {
        **written.tensors,
        "smoothing/rows": np.zeros((2, 10), np.float32),
        "smoothing/stamps": np.arange(2),
        "smoothing/ids": pack_ids(["a", "b"]),
    }
    older_state = {**written.state, "smoothing_id_count": None}
    save_checkpoint(folder, older_tensors, older_state)
    save_checkpoint(folder, *unrestorable(written.tensors, written.state))

    daemon = EdgeDaemon(device_config(tmp_path, mlp_pair.bundle, "dev-a", state))
    with caplog.at_level(logging.WARNING, logger="dslo_edge.daemon"):
        daemon._restore()
    daemon._state_lock.release()

    assert daemon.restored_from == "factory weights"
    expected = (
        "cannot restore checkpoint-00000001.safetensors, the generation before "
        "checkpoint-00000002.safetensors, either"
    )
    assert expected in caplog.text
    assert "invalid smoothing_id_count None" in caplog.text


def moved_folders(state: Path) -> list[list[str]]:
    """Return the file names in each folder of mismatched-checkpoints."""
    folders = sorted((state / "mismatched-checkpoints").iterdir())
    return sorted(sorted(path.name for path in folder.iterdir()) for folder in folders)


def test_other_device_generation_is_set_aside_alone(mlp_pair, tmp_path, caplog) -> None:
    state = tmp_path / "state"
    folder = state / "checkpoints"
    written = take_first_checkpoint(tmp_path, mlp_pair.bundle, state)
    adapted = adapted_weights(written.tensors, 0.5)
    save_checkpoint(folder, adapted, written.state, keep=3)
    other = adapted_weights(written.tensors, 2.0)
    foreign = save_checkpoint(
        folder, other, {**written.state, "device_id": "dev-b"}, keep=3
    )
    foreign_bytes = foreign.read_bytes()
    save_checkpoint(folder, *unrestorable(adapted, written.state), keep=3)

    with caplog.at_level(logging.WARNING, logger="dslo_edge.daemon"):
        daemon = restore_then_save(tmp_path, mlp_pair.bundle, state)

    assert daemon.restored_from == "checkpoint-00000001.safetensors"
    restored = load_latest_checkpoint(folder)
    assert restored is not None
    for name, value in adapted.items():
        if name.startswith(WEIGHT_PREFIX):
            np.testing.assert_array_equal(restored.tensors[name], value)
    assert generation_names(folder) == [
        "checkpoint-00000002.safetensors",
        "checkpoint-00000001.safetensors",
    ]
    # One folder for the other device's generation, one for the newest.
    assert moved_folders(state) == [
        ["checkpoint-00000002.safetensors"],
        ["checkpoint-00000003.safetensors"],
    ]
    [moved] = (state / "mismatched-checkpoints").glob("*/checkpoint-00000002.*")
    assert moved.read_bytes() == foreign_bytes
    expected = (
        "Device dev-a does not restore checkpoint-00000002.safetensors, which "
        f"device 'dev-b' wrote; moved it to {moved}"
    )
    assert expected in caplog.text


def test_other_device_generation_not_moved_along(mlp_pair, tmp_path, caplog) -> None:
    state = tmp_path / "state"
    folder = state / "checkpoints"
    written = take_first_checkpoint(tmp_path, mlp_pair.bundle, state)
    save_checkpoint(folder, written.tensors, {**written.state, "device_id": "dev-b"})
    save_checkpoint(folder, *unrestorable(written.tensors, written.state))

    daemon = EdgeDaemon(device_config(tmp_path, mlp_pair.bundle, "dev-a", state))
    with caplog.at_level(logging.WARNING, logger="dslo_edge.daemon"):
        daemon._restore()
    daemon._state_lock.release()

    assert daemon.restored_from == "factory weights"
    assert list_checkpoints(folder) == []
    # This device's generation and the other device's are in separate folders.
    assert moved_folders(state) == [
        ["checkpoint-00000001.safetensors"],
        ["checkpoint-00000002.safetensors"],
    ]
    assert "which device 'dev-b' wrote; moved it to" in caplog.text
    assert "moved the checkpoints it cannot load to" in caplog.text


def test_rollback_restores_older_generation(
    mlp_pair, tmp_path, monkeypatch, caplog
) -> None:
    state = tmp_path / "state"
    folder = state / "checkpoints"
    daemon, written = daemon_and_first_checkpoint(tmp_path, mlp_pair.bundle, state)
    # Every acknowledged update is in the older generation.
    adapted = adapted_weights(written.tensors, 0.5)
    save_checkpoint(folder, adapted, written.state)
    save_checkpoint(folder, *unrestorable(adapted, written.state))

    healthy = forced_rollback(daemon, monkeypatch, caplog)

    assert not healthy
    for name, value in daemon.student.get_weights().items():
        np.testing.assert_array_equal(value, adapted[WEIGHT_PREFIX + name])
    # The restored generation and the copy that the rollback saved of it.
    assert generation_names(folder) == [
        "checkpoint-00000002.safetensors",
        "checkpoint-00000001.safetensors",
    ]
    moved = list((state / "mismatched-checkpoints").glob("*/*"))
    assert [path.name for path in moved] == ["checkpoint-00000002.safetensors"]
    expected = "rolled back to checkpoint-00000001.safetensors: forced failure"
    assert expected in caplog.text


def test_rollback_past_unreadable_newest_keeps_two(
    mlp_pair, tmp_path, monkeypatch, caplog
) -> None:
    state = tmp_path / "state"
    folder = state / "checkpoints"
    daemon, written = daemon_and_first_checkpoint(tmp_path, mlp_pair.bundle, state)
    adapted = adapted_weights(written.tensors, 0.5)
    save_checkpoint(folder, adapted, written.state)
    newest = save_checkpoint(folder, adapted, written.state)
    newest.write_bytes(newest.read_bytes()[:-64])

    healthy = forced_rollback(daemon, monkeypatch, caplog)

    assert not healthy
    # Both generations left hold every acknowledged update, so the
    # unreadable one must not count as one of them when the save prunes.
    generations = list_checkpoints(folder)
    assert len(generations) == 2, generation_names(folder)
    for sequence, path in generations:
        readable = load_older_checkpoint(folder, sequence + 1)
        assert readable is not None and readable.path == path, path.name
    assert (folder / "checkpoint-00000002.safetensors.corrupt").is_file()


def test_stop_before_accept_restores_old_model(mlp_pair, tmp_path, caplog) -> None:
    from dslo_edge.ota_sender import pack_bundle
    from dslo_edge.swap import BundleStore

    state = tmp_path / "state"
    folder = state / "checkpoints"
    written = take_first_checkpoint(tmp_path, mlp_pair.bundle, state)
    adapted = adapted_weights(written.tensors, 1.0)
    save_checkpoint(folder, adapted, written.state)
    save_checkpoint(folder, adapted, written.state)
    # The daemon switched to a release of another model and saved that model's
    # checkpoint, then stopped before it accepted the release.
    store = BundleStore(state)
    archive = tmp_path / "release.tar"
    archive.write_bytes(pack_bundle(mlp_pair.bundle))
    release = store.install_archive(archive)
    store.activate(release, pending=True)
    other_model = {
        name.replace(WEIGHT_PREFIX, f"{WEIGHT_PREFIX}other_", 1): value
        for name, value in written.tensors.items()
    }
    save_checkpoint(folder, other_model, written.state)

    daemon = EdgeDaemon(device_config(tmp_path, mlp_pair.bundle, "dev-a", state))
    with caplog.at_level(logging.WARNING, logger="dslo_edge"):
        daemon._restore()
    daemon._state_lock.release()

    assert daemon.bundle.path == mlp_pair.bundle
    for name, value in daemon.student.get_weights().items():
        np.testing.assert_array_equal(value, adapted[WEIGHT_PREFIX + name])
    moved = list((state / "mismatched-checkpoints").glob("*/*"))
    assert [path.name for path in moved] == ["checkpoint-00000003.safetensors"]
