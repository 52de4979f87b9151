"""Firmware profiles: validation, the shipped boards and bundle fit checks."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from dslo_edge.applied_ids import AppliedIds
from dslo_edge.bundle import load_bundle
from dslo_edge.checkpoint import save_checkpoint
from dslo_edge.config import load_config
from dslo_edge.daemon import _load_profile
from dslo_edge.dynamic import SoftLabelEngine, TaskSettings
from dslo_edge.errors import ConfigError
from dslo_edge.fit import check_bundle
from dslo_edge.footprint import (
    BASELINE_RSS_BYTES,
    MIB,
    estimate_memory,
    estimate_storage,
)
from dslo_edge.profiles import list_profiles, load_profile, load_profile_file
from tests.bundle_files import write_bundle

SHIPPED_BOARDS = {
    "raspberry-pi-zero-2w",
    "raspberry-pi-4b",
    "raspberry-pi-5",
    "jetson-nano",
    "coral-dev-board-mini",
    "generic-x86_64",
    "generic-aarch64",
}

VALID_PROFILE = """\
name = "{name}"
title = "Test board"

[board]
architecture = "aarch64"
cores = 4
ram_mb = 1024
storage_mb = 4096

[budget]
ram_mb = 256
storage_mb = 1024

[os]
name = "Debian 12"
python = "3.11"
numpy = "1.24"
glibc = "2.36"

[power]
idle_watts = 1.0
active_watts = 4.0

[thermal]
limit_c = 75

[[interpreters]]
package = "ai-edge-litert"
version = "2.3.0"
python = ">=3.10,<3.15"
numpy = ">=1.23.2"
min_glibc = "2.27"
"""


def write_profile(folder: Path, text: str | None = None, name: str = "board") -> Path:
    path = folder / f"{name}.toml"
    path.write_text(text if text is not None else VALID_PROFILE.format(name=name))
    return path


# The shipped profiles


def test_shipped_profiles_all_load() -> None:
    profiles = {profile.name: profile for profile in list_profiles()}
    assert SHIPPED_BOARDS <= set(profiles)
    for profile in profiles.values():
        assert profile.idle_watts < profile.active_watts
        assert profile.budget_ram_mb <= profile.ram_mb
        assert profile.interpreters


def test_shipped_profile_power_model() -> None:
    model = load_profile("raspberry-pi-4b").power_model()
    assert model.name == "raspberry-pi-4b"
    assert model.cores == 4
    assert model.idle_watts == pytest.approx(2.7)


def test_jetson_profile_names_its_power_sensor() -> None:
    profile = load_profile("jetson-nano")
    [(path, unit)] = profile.power_files
    assert path.endswith("in_power0_input")
    assert unit == "mW"


# Validation errors name the file, the key and the value


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            'architecture = "aarch64"',
            'architecture = "arm64"',
            "board.architecture = 'arm64'",
        ),
        ("cores = 4", "cores = 0", "board.cores = 0 is invalid"),
        ("cores = 4", 'cores = "4"', "board.cores = '4' is invalid"),
        ("ram_mb = 256", "ram_mb = 2048", "budget.ram_mb = 2048 is invalid"),
        ('python = "3.11"', 'python = "three"', "os.python = 'three' is invalid"),
        ("active_watts = 4.0", "active_watts = 0.5", "power.active_watts = 0.5"),
        ("active_watts = 4.0", "active_watts = inf", "power.active_watts = inf"),
        ("idle_watts = 1.0", "idle_watts = inf", "power.idle_watts = inf"),
        ("limit_c = 75", "limit_c = 500", "thermal.limit_c = 500 is invalid"),
        ('python = ">=3.10,<3.15"', 'python = "~=>3"', "interpreters[0].python"),
        (
            'package = "ai-edge-litert"',
            'package = "tensorflow"',
            "interpreters[0].package",
        ),
        ("cores = 4", "cores = 4\ncolour = 1", "unknown key board.colour"),
        ("idle_watts = 1.0\n", "", "missing required key power.idle_watts"),
    ],
)
def test_invalid_value_names_file_key_and_value(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    text = VALID_PROFILE.format(name="board")
    assert old in text
    path = write_profile(tmp_path, text.replace(old, new, 1))
    with pytest.raises(ConfigError) as caught:
        load_profile_file(path)
    assert str(path) in str(caught.value)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "idle_watts = 1.0",
            "idle_watts = inf",
            "power.idle_watts = inf is invalid; expected finite positive watts",
        ),
        (
            "idle_watts = 1.0",
            "idle_watts = nan",
            "power.idle_watts = nan is invalid; expected finite positive watts",
        ),
        (
            "active_watts = 4.0",
            "active_watts = 4.0\nbattery_wh = inf",
            "power.battery_wh = inf is invalid; expected a finite positive "
            "capacity in Wh",
        ),
        (
            "active_watts = 4.0",
            "active_watts = 4.0\nbattery_wh = -1.0",
            "power.battery_wh = -1.0 is invalid; expected a finite positive "
            "capacity in Wh",
        ),
        (
            "active_watts = 4.0",
            "active_watts = inf",
            "power.active_watts = inf is invalid; expected finite watts above "
            "idle_watts (1.0)",
        ),
    ],
)
def test_unbounded_float_error_says_finite(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    text = VALID_PROFILE.format(name="board")
    assert old in text
    path = write_profile(tmp_path, text.replace(old, new, 1))

    with pytest.raises(ConfigError) as caught:
        load_profile_file(path)

    assert str(caught.value) == f"{path}: {expected}"


def test_name_must_match_file_name(tmp_path: Path) -> None:
    path = write_profile(tmp_path, VALID_PROFILE.format(name="other"), name="board")
    with pytest.raises(
        ConfigError, match="name = 'other' is invalid; expected \"board\""
    ):
        load_profile_file(path)


def test_missing_table_and_bad_toml(tmp_path: Path) -> None:
    text = VALID_PROFILE.format(name="board").replace("[thermal]\nlimit_c = 75\n", "")
    with pytest.raises(ConfigError, match=r"missing required table \[thermal\]"):
        load_profile_file(write_profile(tmp_path, text))
    broken = write_profile(tmp_path, "name = ", name="broken")
    with pytest.raises(ConfigError) as caught:
        load_profile_file(broken)
    message = str(caught.value)
    assert message.startswith(f"cannot read firmware profile {broken}: ")
    assert "Invalid value (at end of document)" in message
    assert message.endswith("; correct the TOML syntax at that line")


def test_misspelt_table_is_named_as_unknown(tmp_path: Path) -> None:
    text = VALID_PROFILE.format(name="board").replace("[thermal]", "[thermals]")
    with pytest.raises(ConfigError) as raised:
        load_profile_file(write_profile(tmp_path, text))

    message = str(raised.value)
    assert "unknown key thermals (did you mean thermal?)" in message
    assert "missing" not in message


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "cores = 4",
            "core = 4",
            "board.cores (a positive core count); found "
            "board.core: did you mean cores?",
        ),
        (
            "limit_c = 75",
            "limit = 75",
            "thermal.limit_c (degrees Celsius in "
            "30..120); found thermal.limit: did you mean limit_c?",
        ),
        (
            "idle_watts = 1.0",
            "idle_watt = 1.0",
            "power.idle_watts (finite positive watts); found power.idle_watt: "
            "did you mean idle_watts?",
        ),
    ],
)
def test_misspelt_key_is_named(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    text = VALID_PROFILE.format(name="board").replace(old, new)
    with pytest.raises(ConfigError) as raised:
        load_profile_file(write_profile(tmp_path, text))

    assert f"missing required key {expected}" in str(raised.value)


def test_missing_key_names_no_other_key(tmp_path: Path) -> None:
    text = VALID_PROFILE.format(name="board").replace("ram_mb = 256\n", "")
    with pytest.raises(ConfigError) as raised:
        load_profile_file(write_profile(tmp_path, text))

    message = str(raised.value)
    assert message.endswith(
        "missing required key budget.ram_mb (a positive size "
        "in MiB, at most the board's 1024 MiB)"
    )


def test_top_level_key_after_table_is_explained(tmp_path: Path) -> None:
    # TOML puts a key written after [thermal] into that table.
    text = VALID_PROFILE.format(name="board")
    text = text[: text.index("[[interpreters]]")] + "interpreters = []\n"
    with pytest.raises(ConfigError) as raised:
        load_profile_file(write_profile(tmp_path, text))

    message = str(raised.value)
    assert "unknown key thermal.interpreters" in message
    assert "interpreters is a top-level key" in message
    assert "above the first [table] header" in message


def test_missing_interpreters_says_where(tmp_path: Path) -> None:
    text = VALID_PROFILE.format(name="board")
    text = text[: text.index("[[interpreters]]")]
    with pytest.raises(ConfigError) as raised:
        load_profile_file(write_profile(tmp_path, text))

    message = str(raised.value)
    assert "missing [[interpreters]] tables" in message
    assert "write interpreters = [] above the first [table] header" in message


def test_empty_profile_directory_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a profile\n")
    with pytest.raises(
        ConfigError, match=r"no firmware profiles \(\*\.toml files\) in "
    ):
        list_profiles(tmp_path)


@pytest.mark.parametrize(
    "load", [list_profiles, lambda folder: load_profile("raspberry-pi-4b", folder)]
)
def test_profile_directory_that_is_a_file(tmp_path: Path, load) -> None:
    path = tmp_path / "raspberry-pi-4b.toml"
    path.write_text("")

    with pytest.raises(ConfigError) as caught:
        load(path)

    assert str(caught.value).startswith(
        f"firmware profile directory {path} is a file, not a directory; "
    )
    assert "not found" not in str(caught.value)


def test_power_file_unit_is_checked(tmp_path: Path) -> None:
    text = VALID_PROFILE.format(name="board") + (
        '\n[sensors]\npower_files = [{ path = "/sys/x", unit = "kW" }]\n'
    )
    with pytest.raises(ConfigError, match=r"sensors.power_files\[0\].unit = 'kW'"):
        load_profile_file(write_profile(tmp_path, text))


def test_unknown_profile_lists_known_ones(tmp_path: Path) -> None:
    write_profile(tmp_path, name="board")
    with pytest.raises(ConfigError, match="'pi9' not found .* known profiles: board"):
        load_profile("pi9", tmp_path)


def test_misspelt_profile_names_closest(tmp_path: Path) -> None:
    write_profile(tmp_path, name="raspberry-pi-4b")
    write_profile(tmp_path, name="jetson-nano")

    with pytest.raises(ConfigError) as caught:
        load_profile("raspbery-pi-4b", tmp_path)

    message = str(caught.value)
    assert "'raspbery-pi-4b' not found" in message
    assert "which may be a misspelling of raspberry-pi-4b;" in message
    assert "known profiles: jetson-nano, raspberry-pi-4b" in message


@pytest.mark.parametrize("value", ["data.npz", "boards/pi", "/tmp"])
def test_profile_path_without_toml_is_named(
    tmp_path: Path, monkeypatch, value: str
) -> None:
    write_profile(tmp_path, name="board")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.npz").write_bytes(b"npz")

    with pytest.raises(ConfigError) as caught:
        load_profile(value, tmp_path)

    assert str(caught.value) == (
        f"firmware profile {value!r} is a path, but not to a .toml file; give "
        f"a profile file ending in .toml, or a profile name from {tmp_path}: board"
    )


def test_missing_profile_file_lists_names(tmp_path: Path, monkeypatch) -> None:
    write_profile(tmp_path, name="board")
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ConfigError) as caught:
        load_profile("boards/pi9.toml", tmp_path)

    assert str(caught.value) == (
        "firmware profile file boards/pi9.toml not found; give the path of an "
        f"existing .toml profile file, or a profile name from {tmp_path}: board"
    )


def test_profile_name_with_toml_suggests_name(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "shipped").mkdir()
    write_profile(tmp_path / "shipped", name="board")
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ConfigError) as caught:
        load_profile("board.toml", tmp_path / "shipped")

    assert str(caught.value) == (
        "firmware profile file board.toml not found; to use the shipped "
        "profile, give its name 'board' without .toml"
    )


def test_profile_file_with_toml_still_loads(tmp_path: Path, monkeypatch) -> None:
    write_profile(tmp_path, name="board")
    monkeypatch.chdir(tmp_path)

    assert load_profile("board.toml", tmp_path / "unused").name == "board"


# Footprint estimates


def test_memory_estimate_parts(tmp_path: Path) -> None:
    bundle = load_bundle(write_bundle(tmp_path / "bundle"))
    memory = estimate_memory(bundle, batch_size=32, queue_size=256)
    weights = 64 * 32 + 32 + 32 * 10 + 10
    assert memory.baseline == BASELINE_RSS_BYTES
    assert memory.model_file == 27_296
    assert memory.weights == weights * 4 * 3
    # The placeholder model file cannot be read, so the estimate falls back
    # to the dense layer widths.
    assert memory.activations == 32 * (32 + 10) * 4 * 3
    # infer: x, logits, probabilities; train: x, soft, hard, alpha and three
    # scalars; get_weights and set_weights: the weights, plus one scalar.
    infer = 32 * (64 + 10 + 10)
    train = 32 * (64 + 10 + 1 + 1) + 3
    assert memory.signature_tensors == 4 * (infer + train + 2 * weights + 1)
    per_sample = 64 * 4 + 10 * 4 + 4 + 16
    assert memory.update_queue == 2 * 256 * (64 + 32 * per_sample)
    # Two 4 MiB inference payloads and 16 MiB of model update chunks.
    assert memory.other_queues == 8 * 2**20 + 16 * 2**20
    assert memory.total == sum(
        value for key, value in memory.as_dict().items() if key != "total"
    )


def test_memory_estimate_matches_full_stores(tmp_path: Path) -> None:
    bundle = load_bundle(write_bundle(tmp_path / "bundle"))
    capacity, applied_capacity = 20_000, 20_000
    rng = np.random.default_rng(0)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        engine = SoftLabelEngine(TaskSettings(smoothing_capacity=capacity))
        for start in range(0, capacity, 500):
            ids = [f"sample-{index:08d}" for index in range(start, start + 500)]
            probabilities = rng.dirichlet(np.ones(10), size=500).astype(np.float32)
            engine.prepare(ids, probabilities, teacher_round=1)
            engine.finish_update()
        stores = tracemalloc.get_traced_memory()[0] - before
        applied = AppliedIds(applied_capacity)
        for index in range(applied_capacity):
            applied.add(index.to_bytes(16, "big"))
        applied_bytes = tracemalloc.get_traced_memory()[0] - before - stores
    finally:
        tracemalloc.stop()

    memory = estimate_memory(
        bundle, smoothing_capacity=capacity, applied_id_capacity=applied_capacity
    )
    assert len(engine.store) == capacity
    assert len(applied) == applied_capacity
    assert stores <= memory.smoothing_store
    assert stores >= memory.smoothing_store * 0.75
    assert applied_bytes <= memory.applied_ids
    assert applied_bytes >= memory.applied_ids * 0.75


def test_memory_estimate_caps_update_queue(tmp_path: Path) -> None:
    bundle = load_bundle(write_bundle(tmp_path / "bundle"))
    per_update = 64 + 256 * (64 * 4 + 10 * 4 + 4 + 16)
    uncapped = estimate_memory(bundle, batch_size=256, queue_size=40)
    capped = estimate_memory(
        bundle, batch_size=256, queue_size=40, max_queued_bytes=1_000_000
    )
    assert uncapped.update_queue == 2 * 40 * per_update
    assert capped.update_queue == 1_000_000
    assert uncapped.total - capped.total == 2 * 40 * per_update - 1_000_000


def test_memory_estimate_counts_one_oversized_update(tmp_path: Path) -> None:
    bundle = load_bundle(write_bundle(tmp_path / "bundle"))
    per_update = 64 + 256 * (64 * 4 + 10 * 4 + 4 + 16)
    memory = estimate_memory(
        bundle, batch_size=256, queue_size=40, max_queued_bytes=50_000
    )
    # The queue takes one update larger than max_queued_bytes when it is empty.
    assert per_update > 50_000
    assert memory.update_queue == per_update


def test_storage_estimate_counts_update_copies(tmp_path: Path) -> None:
    bundle = load_bundle(write_bundle(tmp_path / "bundle"))
    storage = estimate_storage(bundle, smoothing_capacity=100, applied_id_capacity=0)
    size = sum(p.stat().st_size for p in bundle.path.iterdir())
    assert storage.bundle == size
    assert storage.model_update == 2 * size
    weights = 64 * 32 + 32 + 32 * 10 + 10
    # Smoothing row of 10 floats, monitor row of 10 floats and the round,
    # each with a 16-byte id and an 8-byte stamp.
    per_sample = (10 + 11) * 4 + 2 * (16 + 8)
    assert storage.checkpoints == 2 * (weights * 4 + 100 * per_sample)


def test_storage_estimate_matches_full_checkpoint(tmp_path: Path) -> None:
    bundle = load_bundle(write_bundle(tmp_path / "bundle"))
    capacity, applied_capacity = 2000, 5000
    engine = SoftLabelEngine(TaskSettings(smoothing_capacity=capacity))
    rng = np.random.default_rng(0)
    for start in range(0, capacity, 100):
        # Ids of 15 characters, about the size of a hash id from push.
        ids = [f"sample-{index:08d}" for index in range(start, start + 100)]
        engine.prepare(ids, rng.dirichlet(np.ones(10), size=100), teacher_round=1)
        engine.finish_update()
    applied = AppliedIds(applied_capacity)
    for index in range(applied_capacity):
        applied.add(index.to_bytes(16, "big"))
    tensors, state = engine.checkpoint_content("")
    for name, shape in bundle.weight_shapes.items():
        tensors[f"weights/{name}"] = rng.random(shape, dtype=np.float32)
    tensors["applied_ids"] = applied.to_array()
    path = save_checkpoint(tmp_path / "checkpoints", tensors, state)

    storage = estimate_storage(
        bundle, smoothing_capacity=capacity, applied_id_capacity=applied_capacity
    )
    per_checkpoint = storage.checkpoints // 2
    size = path.stat().st_size
    assert len(engine.store) == capacity
    assert size <= per_checkpoint * 1.05
    assert size >= per_checkpoint * 0.9


def test_estimates_count_every_head(two_head_bundle: Path) -> None:
    bundle = load_bundle(two_head_bundle)
    memory = estimate_memory(bundle, batch_size=32, queue_size=256)
    storage = estimate_storage(bundle, smoothing_capacity=100)
    # A 64-32 trunk with a 10-class head "digit" and a 3-class head "shape".
    weights = 64 * 32 + 32 + 32 * 10 + 10 + 32 * 3 + 3
    assert memory.weights == weights * 4 * 3
    # Smoothing and monitor rows of both heads, and each head's id objects.
    assert memory.smoothing_store == 10000 * ((2 * (10 + 3) + 2) * 4 + 2 * 280)
    assert memory.applied_ids == 100_000 * 176
    per_sample = 64 * 4 + (10 + 3) * 4 + 2 * 4 + 16
    assert memory.update_queue == 2 * 256 * (64 + 32 * per_sample)
    per_sample = (2 * (10 + 3) + 2) * 4 + 2 * 2 * (16 + 8)
    assert storage.checkpoints == 2 * (weights * 4 + 100 * per_sample + 100_000 * 16)


# Bundle fit checks


def test_small_bundle_fits_raspberry_pi_4(tmp_path: Path) -> None:
    bundle = load_bundle(write_bundle(tmp_path / "bundle"))
    report = check_bundle(bundle, load_profile("raspberry-pi-4b"))
    assert report.fits
    assert report.problems == ()
    assert report.interpreter == "ai-edge-litert==2.3.0"
    assert "needs numpy >=1.23.2" in report.notes[0]


def test_two_head_bundle_fits_raspberry_pi_4(two_head_bundle: Path) -> None:
    report = check_bundle(load_bundle(two_head_bundle), load_profile("raspberry-pi-4b"))
    assert report.fits
    assert report.problems == ()
    assert report.interpreter == "ai-edge-litert==2.3.0"


def test_large_student_exceeds_zero_2w_budget(tmp_path: Path) -> None:
    bundle = load_bundle(
        write_bundle(tmp_path / "bundle", inputs=4096, hidden=2048, classes=100)
    )
    profile = load_profile("raspberry-pi-zero-2w")
    report = check_bundle(bundle, profile)
    assert not report.fits
    assert report.memory.total > profile.budget_ram_mb * MIB
    assert "exceeds the RAM budget of 128 MiB" in report.problems[0]


def test_old_python_boards_are_rejected(tmp_path: Path) -> None:
    bundle = load_bundle(write_bundle(tmp_path / "bundle"))
    for name, version in (("jetson-nano", "3.6"), ("coral-dev-board-mini", "3.7")):
        report = check_bundle(bundle, load_profile(name))
        assert not report.fits
        assert report.interpreter is None
        assert any(f"ships Python {version}" in p for p in report.problems)
        assert any("no LiteRT interpreter" in p for p in report.problems)


def test_interpreter_needs_newer_glibc(tmp_path: Path) -> None:
    text = VALID_PROFILE.format(name="board").replace(
        'glibc = "2.36"', 'glibc = "2.31"'
    )
    old_wheel = text[text.index("[[interpreters]]") :]
    tflite_wheel = (
        "[[interpreters]]\n"
        'package = "tflite-runtime"\n'
        'version = "2.14.0"\n'
        'python = ">=3.8,<3.12"\n'
        'numpy = "<2"\n'
        'min_glibc = "2.34"\n'
    )
    profile = load_profile_file(
        write_profile(tmp_path, text.replace(old_wheel, tflite_wheel))
    )
    bundle = load_bundle(write_bundle(tmp_path / "bundle"))
    report = check_bundle(bundle, profile)
    assert not report.fits
    assert (
        "tflite-runtime 2.14.0 needs glibc 2.34, the board has 2.31"
        in (report.problems[0])
    )


def test_bundle_that_accepts_only_other_interpreter(tmp_path: Path) -> None:
    bundle = load_bundle(
        write_bundle(tmp_path / "bundle", interpreters=["tflite-runtime>=2.14"])
    )
    profile = load_profile_file(write_profile(tmp_path))
    report = check_bundle(bundle, profile)
    assert not report.fits
    assert "ai-edge-litert 2.3.0 is not one the bundle accepts" in report.problems[0]


def test_profile_path_is_relative_to_config(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "boards").mkdir()
    profile = write_profile(tmp_path / "boards", name="shed-pi")
    config_path = tmp_path / "device.toml"
    config_path.write_text(
        '[device]\nid = "shed"\nbundle = "bundle"\nprofile = "boards/shed-pi.toml"\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    config = load_config(config_path)

    assert config.profile == str(profile)
    assert _load_profile(config).name == "shed-pi"


def test_profile_name_stays_a_name(tmp_path: Path) -> None:
    config_path = tmp_path / "device.toml"
    config_path.write_text(
        '[device]\nid = "pi"\nbundle = "bundle"\nprofile = "raspberry-pi-4b"\n'
    )

    config = load_config(config_path)

    assert config.profile == "raspberry-pi-4b"
    assert _load_profile(config).name == "raspberry-pi-4b"


def _profile_config(tmp_path: Path, profile: str) -> Path:
    config_path = tmp_path / "device.toml"
    config_path.write_text(
        f'[device]\nid = "pi"\nbundle = "bundle"\nprofile = "{profile}"\n'
    )
    return config_path


def test_profile_of_other_architecture_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    config = load_config(_profile_config(tmp_path, "raspberry-pi-4b"))
    caplog.set_level("WARNING", logger="dslo_edge.daemon")

    profile = _load_profile(config)

    assert profile.name == "raspberry-pi-4b"
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1
    assert "profile raspberry-pi-4b is for aarch64 systems" in messages[0]
    assert "uname -m reports x86_64" in messages[0]
    assert str(config.source) in messages[0]


def test_profile_of_same_architecture_is_quiet(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    config = load_config(_profile_config(tmp_path, "raspberry-pi-4b"))
    caplog.set_level("WARNING", logger="dslo_edge.daemon")

    _load_profile(config)

    assert caplog.records == []
