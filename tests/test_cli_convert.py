"""The convert and demo commands: output paths and option values."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dslo_edge.broker import find_mosquitto
from dslo_edge.cli import EXIT_CONFIG, EXIT_INTERRUPTED, main
from dslo_edge.config import render_config
from tests.cli_process import run_cli


def run(*arguments: str):
    return CliRunner().invoke(main, list(arguments))


@pytest.fixture
def keras_files(mlp_pair, tmp_path: Path) -> list[str]:
    """The --teacher and --student options for the session's MLP pair."""
    teacher = tmp_path / "teacher.keras"
    student = tmp_path / "student.keras"
    mlp_pair.teacher.save(teacher)
    mlp_pair.student.save(student)
    return ["convert", "--teacher", str(teacher), "--student", str(student)]


@pytest.mark.slow
def test_convert_creates_missing_parents(keras_files, tmp_path) -> None:
    parent = tmp_path / "new" / "deep"

    result = run(*keras_files, "--out", str(parent / "bundle"))

    assert result.exit_code == 0, result.output
    manifest = json.loads((parent / "bundle" / "manifest.json").read_text())
    assert manifest["class_count"] == 10
    assert sorted(path.name for path in parent.iterdir()) == ["bundle"]


def test_convert_parent_file_fails_first(keras_files, tmp_path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("")

    result = run(*keras_files, "--out", str(blocker / "bundle"))

    assert result.exit_code == 2
    expected = f"Error: Invalid value for --out: {blocker} is a file, not a directory"
    assert expected in result.output
    assert blocker.read_text() == ""


@pytest.mark.parametrize("option", ["--teacher", "--student"])
def test_convert_savedmodel_directory_is_explained(tmp_path, option) -> None:
    saved_model = tmp_path / "exported"
    saved_model.mkdir()
    (saved_model / "saved_model.pb").write_bytes(b"")
    model = tmp_path / "model.keras"
    model.write_bytes(b"")
    paths = {"--teacher": str(model), "--student": str(model), option: str(saved_model)}
    out = tmp_path / "bundle"

    result = run(
        "convert", *[i for pair in paths.items() for i in pair], "--out", str(out)
    )

    assert result.exit_code == 2
    assert f"Invalid value for {option}: {saved_model} is a TensorFlow" in result.output
    assert 'save the Keras model with model.save("model.keras")' in result.output
    assert not out.exists()


def test_convert_directory_as_model_is_rejected(tmp_path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()

    result = run(
        "convert", "--teacher", str(folder), "--student", str(folder), "--out", "b"
    )

    assert result.exit_code == 2
    expected = f"Invalid value for --teacher: {folder} is a directory, expected a"
    assert expected in result.output
    assert ".keras file written by model.save()" in result.output


def test_convert_overwrite_keeps_other_files(keras_files, tmp_path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("user data")

    result = run(*keras_files, "--out", str(out), "--overwrite")

    assert result.exit_code == EXIT_CONFIG
    assert f"output directory {out} is not a bundle" in result.output
    assert "--overwrite replaces only a directory written by convert" in result.output
    assert (out / "notes.txt").read_text() == "user data"


def test_convert_error_names_overwrite_option(keras_files, tmp_path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "notes.txt").write_text("user data")

    result = run(*keras_files, "--out", str(out))

    assert result.exit_code == EXIT_CONFIG
    assert "exists and is not empty" in result.output
    assert "pass --overwrite to replace it" in result.output
    assert "overwrite=True" not in result.output


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--optimizer", "adam", "--weight-decay", "0.01"],
            "--weight-decay is used only with --optimizer adamw",
        ),
        (["--momentum", "0.5"], "--momentum is used only with --optimizer momentum"),
        (
            ["--optimizer", "adamw", "--nesterov"],
            "--nesterov is used only with --optimizer momentum",
        ),
        (
            ["--representative", "REPRESENTATIVE"],
            "--representative is used only with --teacher-precision int8 or "
            "--int8-student-copy",
        ),
    ],
)
def test_convert_rejects_ignored_options(
    keras_files, tmp_path, options, message
) -> None:
    samples = tmp_path / "samples.npz"
    np.savez(samples, x=np.zeros((4, 64), np.float32))
    options = [str(samples) if word == "REPRESENTATIVE" else word for word in options]
    out = tmp_path / "bundle"

    result = run(*keras_files, "--out", str(out), *options)

    assert result.exit_code == 2
    assert message in result.output
    assert not out.exists()


def _write_text_file(path: Path) -> str:
    path.write_text("0.1,0.2,0.3\n")
    return f"invalid --representative: cannot read {path} as .npz"


def _write_npy_file(path: Path) -> str:
    np.save(path, np.zeros((4, 64), np.float32))
    return f"invalid --representative: {path} is a single .npy array"


def _write_text_x(path: Path) -> str:
    np.savez(path, x=np.full((4, 64), "0.5"))
    return f"invalid --representative: {path}: array 'x' has dtype <U3"


def _write_without_x(path: Path) -> str:
    np.savez(path, inputs=np.zeros((4, 64), np.float32))
    return (
        f"invalid --representative: {path} has arrays ['inputs']; "
        "expected at least 'x' (inputs)"
    )


@pytest.mark.parametrize(
    ("name", "write"),
    [
        ("samples.csv", _write_text_file),
        ("samples.npy", _write_npy_file),
        ("samples.npz", _write_text_x),
        ("samples.npz", _write_without_x),
    ],
)
def test_convert_rejects_unreadable_representative(
    keras_files, tmp_path, name, write
) -> None:
    samples = tmp_path / name
    message = write(samples)
    out = tmp_path / "bundle"
    options = ["--int8-student-copy", "--representative", str(samples)]

    result = run(*keras_files, "--out", str(out), *options)

    assert result.exit_code == EXIT_CONFIG, result.output
    assert result.output.startswith(f"error: {message}")
    assert result.output.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("shape", [(4, 32), (4, 8, 8), (4,)])
def test_convert_rejects_representative_shape(keras_files, tmp_path, shape) -> None:
    samples = tmp_path / "samples.npz"
    np.savez(samples, x=np.zeros(shape, np.float32))
    out = tmp_path / "bundle"
    options = ["--int8-student-copy", "--representative", str(samples)]

    result = run(*keras_files, "--out", str(out), *options)

    assert result.exit_code == EXIT_CONFIG, result.output
    assert result.output == (
        f"error: invalid --representative: {samples}: the representative data "
        f"has shape {shape}, but the models take inputs of shape (64,); save an "
        "x array of shape (N, 64)\n"
    )
    assert not out.exists()
    # No staging directory is left next to --out.
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "samples.npz",
        "student.keras",
        "teacher.keras",
    ]


@pytest.mark.parametrize(
    ("scope", "message"),
    [
        (
            "last:99",
            "trainable scope last:99 names 99 layers, but the student has 2 "
            "layers with weights; expected last:N with N from 1 to 2, "
            "from:LAYER, all or biases-and-batchnorm",
        ),
        (
            "from:missing",
            # Keras numbers layer names per process, so the list is left out.
            "trainable scope names layer 'missing', which the student does not "
            "have; its layers are: ",
        ),
    ],
)
def test_convert_scope_outside_student_exits_2(
    keras_files, tmp_path, scope, message
) -> None:
    out = tmp_path / "bundle"

    result = run(*keras_files, "--out", str(out), "--trainable", scope)

    assert result.exit_code == 2, result.output
    assert result.output.startswith("Usage: ")
    assert f"Error: Invalid value for --trainable: {message}" in result.output
    assert not out.exists()
    # No staging directory is left next to --out.
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "student.keras",
        "teacher.keras",
    ]


def test_demo_rejects_negative_seed(tmp_path) -> None:
    out = tmp_path / "demo"

    result = run("demo", "--seed", "-5", "--out", str(out))

    assert result.exit_code == 2
    assert "-5 is not in the range 0<=x<=4294967295" in result.output
    assert not out.exists()


def test_demo_report_under_file_fails_first(tmp_path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("")
    out = tmp_path / "demo"

    result = run("demo", "--out", str(out), "--report", str(blocker / "r.json"))

    assert result.exit_code == 2
    expected = f"Invalid value for --report: {blocker} is a file, not a directory"
    assert f"Error: {expected}" in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    ("name", "kind", "expected"),
    [
        ("hub", "file", "a file, but the demo writes a folder there"),
        ("broker", "file", "a file, but the demo writes a folder there"),
        ("state/checkpoints", "file", "a file, but the demo writes a folder there"),
        ("daemon.log", "folder", "a folder, but the demo writes a file there"),
    ],
)
def test_demo_rejects_blocked_entry_first(tmp_path, name, kind, expected) -> None:
    pytest.importorskip("keras")
    pytest.importorskip("sklearn")
    out = tmp_path / "demo"
    (out / "state").mkdir(parents=True)
    (out / ".dslo-demo").write_text("Written by dslo-edge demo; safe to delete.\n")
    blocker = out / name
    if kind == "file":
        blocker.write_text("kept")
    else:
        blocker.mkdir()

    result = run("demo", "--out", str(out))

    assert result.exit_code == 2, result.output
    message = f"{blocker} is {expected}; move the {kind} away or choose another --out"
    assert f"Error: Invalid value for --out: {message}" in result.output
    if kind == "file":
        assert blocker.read_text() == "kept"
    else:
        assert list(blocker.iterdir()) == []
    assert not (out / "student.keras").exists()


def _live_processes_naming(text: str) -> dict[int, str]:
    """Return the command lines, by pid, of running processes that contain ``text``."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The state follows the command name in parentheses; Z is a zombie.
            state = stat.read_text().rpartition(")")[2].split()[0]
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, IndexError):
            continue
        if state != "Z" and text.encode() in command:
            found[int(stat.parent.name)] = command.decode(errors="replace")
    return found


@pytest.mark.slow
def test_demo_sigterm_stops_broker_and_daemon(tmp_path) -> None:
    pytest.importorskip("keras")
    pytest.importorskip("sklearn")
    mosquitto = find_mosquitto()
    if mosquitto is None:
        pytest.skip("mosquitto not found on PATH or at /usr/sbin/mosquitto")
    out = tmp_path / "demo"
    command = ["demo", "--out", str(out), "--broker", "mosquitto"]
    demo = subprocess.Popen(
        [sys.executable, "-m", "dslo_edge.cli", *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        daemon_log = out / "daemon.log"
        deadline = time.monotonic() + 120
        while not (daemon_log.exists() and "connected to" in daemon_log.read_text()):
            assert demo.poll() is None, "the demo ended before its daemon connected"
            assert time.monotonic() < deadline, "the daemon did not connect in 120 s"
            time.sleep(0.1)
        children = _live_processes_naming(str(out))
        del children[demo.pid]
        brokers = [c for c in children.values() if c.startswith(f"{mosquitto} -c ")]
        daemons = [c for c in children.values() if " dslo_edge.cli run " in c]
        assert len(brokers) == 1
        assert len(daemons) == 1

        demo.send_signal(signal.SIGTERM)

        assert demo.wait(timeout=90) == 143
        assert _live_processes_naming(str(out)) == {}
    finally:
        for pid in _live_processes_naming(str(out)):
            os.kill(pid, signal.SIGKILL)


# Prints whether TensorFlow was imported when the command exits.
_REPORT_TENSORFLOW = """
import sys
from dslo_edge.cli import main
try:
    main(sys.argv[1:])
finally:
    print("tensorflow imported:", "tensorflow" in sys.modules, file=sys.stderr)
"""


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--trainable", "bogus"],
            "Invalid value for --trainable: invalid trainable scope 'bogus'; "
            "expected all, from:LAYER, last:N (N >= 1) or biases-and-batchnorm",
        ),
        (["--trainable", "last:0"], "invalid trainable scope 'last:0'"),
        (["--trainable", "from:"], "invalid trainable scope 'from:'"),
        (
            ["--student-precision", "int8"],
            "Invalid value for --student-precision: an int8 student cannot train",
        ),
        (
            ["--teacher-precision", "int8"],
            "int8 files need --representative FILE.npz, an x array of a few "
            "hundred input samples that calibrates their ranges; add it, or "
            "drop --teacher-precision int8",
        ),
        (
            ["--int8-student-copy", "--teacher-precision", "int8"],
            "drop --teacher-precision int8 and --int8-student-copy",
        ),
    ],
)
def test_convert_rejects_option_before_tensorflow(tmp_path, options, message) -> None:
    # The option checks come first, so the model files are never read.
    teacher = tmp_path / "teacher.keras"
    student = tmp_path / "student.keras"
    teacher.write_bytes(b"")
    student.write_bytes(b"")
    out = tmp_path / "bundle"
    arguments = ["--teacher", str(teacher), "--student", str(student)]

    result = subprocess.run(
        [sys.executable, "-c", _REPORT_TENSORFLOW, "convert", *arguments]
        + ["--out", str(out), *options],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "tensorflow imported: False" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.slow
def test_convert_race_names_overwrite_option(
    keras_files, tmp_path, monkeypatch
) -> None:
    import converters.bundle

    out = tmp_path / "bundle"
    convert_files = converters.bundle._convert_files

    def another_writer_first(*args, **kwargs):
        # Another program fills the directory while the models convert.
        out.mkdir()
        (out / "notes.txt").write_text("user data")
        return convert_files(*args, **kwargs)

    monkeypatch.setattr(converters.bundle, "_convert_files", another_writer_first)

    result = run(*keras_files, "--out", str(out))

    assert result.exit_code == 1, result.output
    assert f"output directory {out} exists and is not empty" in result.output
    assert "pass --overwrite to replace it" in result.output
    assert "overwrite=True" not in result.output
    assert (out / "notes.txt").read_text() == "user data"
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "bundle",
        "student.keras",
        "teacher.keras",
    ]


def _write_npz_model(path: Path) -> None:
    # Given a file object, savez keeps the name instead of adding ".npz".
    with path.open("wb") as file:
        np.savez(file, x=np.zeros((4, 64), np.float32))


def _write_zip_without_config(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "not a model")


def _write_text(path: Path) -> None:
    path.write_text("not a model")


@pytest.mark.parametrize(
    ("name", "write", "message"),
    [
        ("teacher.npz", _write_npz_model, "Keras loads only .keras, .h5 and .hdf5"),
        ("teacher.keras", _write_npz_model, "the zip archive has no config.json"),
        ("teacher.keras", _write_zip_without_config, "the zip archive has no config"),
        ("teacher.keras", _write_text, "the file is not a zip archive"),
    ],
)
def test_convert_rejects_non_model_before_tensorflow(
    tmp_path, name, write, message
) -> None:
    teacher = tmp_path / name
    write(teacher)
    student = tmp_path / "student.keras"
    _write_zip_without_config(student)
    out = tmp_path / "bundle"
    arguments = ["--teacher", str(teacher), "--student", str(student)]

    result = subprocess.run(
        [sys.executable, "-c", _REPORT_TENSORFLOW, "convert", *arguments]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == EXIT_CONFIG, result.stderr
    assert result.stderr.startswith(f"error: invalid --teacher {teacher}: {message}")
    assert "expected a .keras file written by model.save()" in result.stderr
    assert "tensorflow imported: False" in result.stderr
    assert not out.exists()


def run_without_write_override(*arguments: str) -> subprocess.CompletedProcess:
    """Run the CLI so that a read-only directory rejects writes, even for root."""
    prefix = []
    if os.geteuid() == 0:
        # Root writes anywhere through CAP_DAC_OVERRIDE, which this drops.
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and setpriv is not installed")
        prefix = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]
    return subprocess.run(
        [*prefix, sys.executable, "-c", _REPORT_TENSORFLOW, *arguments],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("existing", [False, True])
def test_convert_rejects_read_only_parent(tmp_path, existing) -> None:
    # Zip archives with a config.json pass the file checks, which is enough
    # here because the output check fails before Keras reads them.
    teacher = tmp_path / "teacher.keras"
    student = tmp_path / "student.keras"
    for path in (teacher, student):
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("config.json", "{}")
    parent = tmp_path / "read-only"
    out = parent / "bundle"
    parent.mkdir()
    if existing:
        out.mkdir()
    parent.chmod(0o555)
    arguments = ["--teacher", str(teacher), "--student", str(student)]

    try:
        result = run_without_write_override("convert", *arguments, "--out", str(out))
    finally:
        parent.chmod(0o755)

    # Exit status 2 and click's usage message, as for an unwritable
    # evaluate, bench or selftest --out.
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("Usage: ")
    assert f"Error: Invalid value for --out: cannot write to {parent}: " in (
        result.stderr
    )
    assert "Permission denied" in result.stderr
    assert "choose an output path in a writable directory" in result.stderr
    assert "tensorflow imported: False" in result.stderr
    expected = ["bundle"] if existing else []
    assert sorted(path.name for path in parent.iterdir()) == expected


@pytest.mark.parametrize("option", ["--out", "--report"])
def test_demo_rejects_read_only_folder(tmp_path, option) -> None:
    pytest.importorskip("keras")
    pytest.importorskip("sklearn")
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    paths = {"--out": tmp_path / "demo", "--report": tmp_path / "report.json"}
    paths[option] = parent / "target"
    arguments = [f"{name}={path}" for name, path in paths.items()]

    try:
        result = run_without_write_override("demo", *arguments)
    finally:
        parent.chmod(0o755)

    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("Usage: ")
    assert f"Error: Invalid value for {option}: cannot " in result.stderr
    assert "permission denied" in result.stderr.lower()
    assert list(parent.iterdir()) == []
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("command", ["convert", "evaluate"])
def test_empty_out_rejected(tmp_path, command) -> None:
    teacher = tmp_path / "teacher.keras"
    teacher.write_bytes(b"")
    models = ["--teacher", str(teacher), "--student", str(teacher)]
    arguments = models if command == "convert" else []
    before = sorted(Path.cwd().iterdir())

    result = run(command, *arguments, "--out", "")

    assert result.exit_code == 2, result.output
    assert "Invalid value for '--out': expected a path, got an empty value" in (
        result.output
    )
    assert "write --out . for the current directory" in result.output
    assert sorted(Path.cwd().iterdir()) == before


@pytest.mark.slow
def test_convert_sigterm_deletes_staging(keras_files, tmp_path) -> None:
    parent = tmp_path / "bundles"
    parent.mkdir()
    out = parent / "bundle"
    convert = subprocess.Popen(
        [sys.executable, "-m", "dslo_edge.cli", *keras_files, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_staging(convert, parent)
        convert.send_signal(signal.SIGTERM)
        _, stderr = convert.communicate(timeout=60)
    finally:
        if convert.poll() is None:
            convert.kill()
            convert.wait()

    assert convert.returncode == 143, stderr
    assert "Traceback" not in stderr
    assert list(parent.iterdir()) == []


@pytest.mark.slow
def test_sigint_after_wrote_exits_0(keras_files, tmp_path) -> None:
    out = tmp_path / "bundle"
    command = [sys.executable, "-m", "dslo_edge.cli", *keras_files, "--out", str(out)]
    convert = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wrote = convert.stdout.readline()
        # The interpreter is shutting down by then, and the signal must not
        # end the process as killed by SIGINT (-2).
        time.sleep(0.05)
        convert.send_signal(signal.SIGINT)
        _, stderr = convert.communicate(timeout=60)
    finally:
        if convert.poll() is None:
            convert.kill()
            convert.wait()

    assert wrote.startswith(f"wrote {out}: 10 classes"), stderr
    assert convert.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert json.loads((out / "manifest.json").read_text())["class_count"] == 10


# Runs convert and sends itself SIGINT right after the rename that moves the
# new bundle to --out, so the signal lands once the bundle is complete.
_INTERRUPT_AFTER_MOVE = """
import os, signal, sys
from pathlib import Path
from dslo_edge.cli import main
out = Path(sys.argv[sys.argv.index("--out") + 1]).resolve()
rename = Path.rename
def rename_then_signal(self, target):
    moved = rename(self, target)
    if Path(target) == out:
        os.kill(os.getpid(), signal.SIGINT)
    return moved
Path.rename = rename_then_signal
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_sigint_during_move_reports_bundle(keras_files, tmp_path) -> None:
    out = tmp_path / "bundle"

    convert = subprocess.run(
        [sys.executable, "-c", _INTERRUPT_AFTER_MOVE, *keras_files, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert convert.returncode == 0, convert.stderr
    assert convert.stdout.startswith(f"wrote {out}: 10 classes")
    assert convert.stderr == (
        "Ctrl-C (SIGINT) arrived as the bundle was moved into place, after the "
        "conversion completed\n"
    )
    assert json.loads((out / "manifest.json").read_text())["class_count"] == 10
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "bundle",
        "student.keras",
        "teacher.keras",
    ]


# Runs convert and sends itself SIGINT just before the new bundle is moved
# to --out, so the conversion is cut off and --out keeps the earlier bundle.
_INTERRUPT_BEFORE_MOVE = """
import os, signal, sys
import converters.bundle
from dslo_edge.cli import main
move = converters.bundle.move_into_place
def signal_then_move(*args):
    os.kill(os.getpid(), signal.SIGINT)
    return move(*args)
converters.bundle.move_into_place = signal_then_move
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_sigint_before_move_keeps_newer_bundle(keras_files, tmp_path) -> None:
    out = tmp_path / "bundle"
    first = subprocess.run(
        [sys.executable, "-m", "dslo_edge.cli", *keras_files, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert first.returncode == 0, first.stderr
    manifest = out / "manifest.json"
    earlier = manifest.read_bytes()
    # A bundle copied with its times from a host whose clock is ahead.
    future = time.time() + 3600
    os.utime(manifest, (future, future))

    convert = subprocess.run(
        [
            sys.executable,
            "-c",
            _INTERRUPT_BEFORE_MOVE,
            *keras_files,
            "--out",
            str(out),
            "--overwrite",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert convert.returncode == EXIT_INTERRUPTED, convert.stdout
    assert convert.stdout == ""
    assert "stopped on Ctrl-C (SIGINT) before it completed" in convert.stderr
    assert manifest.read_bytes() == earlier


def wait_for_staging(convert: subprocess.Popen, parent: Path) -> None:
    """Wait until ``convert`` writes into a staging directory in ``parent``."""
    deadline = time.monotonic() + 120
    # The output check creates and removes a probe directory of the same
    # prefix at once, so a name seen in two polls in a row is the staging.
    previous: set[Path] = set()
    current = set(parent.glob(".bundle-*"))
    while not previous & current:
        assert convert.poll() is None, "convert ended before it staged files"
        assert time.monotonic() < deadline, "no staging directory within 120 s"
        time.sleep(0.05)
        previous, current = current, set(parent.glob(".bundle-*"))


@pytest.mark.slow
def test_convert_after_sigkill_deletes_staging(keras_files, tmp_path) -> None:
    parent = tmp_path / "bundles"
    parent.mkdir()
    out = parent / "bundle"
    command = [sys.executable, "-m", "dslo_edge.cli", *keras_files, "--out", str(out)]
    convert = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_staging(convert, parent)
    finally:
        convert.kill()
        convert.wait()
    (staging,) = parent.iterdir()

    again = subprocess.run(command, capture_output=True, text=True, timeout=300)

    assert again.returncode == 0, again.stderr
    assert f"Deleted {staging}, left by process {convert.pid}" in again.stderr
    assert [path.name for path in parent.iterdir()] == ["bundle"]
    assert (out / "manifest.json").is_file()


# Swaps OUT's fake bundle for a new one under sigterm_as_exit, as convert
# does, and sends itself SIGTERM right after the first of the two renames.
_SWAP_INTERRUPTED = """
import os, shutil, signal, sys
from pathlib import Path
from converters.output_dir import make_staging_dir, move_into_place
from dslo_edge.cli import sigterm_as_exit
out = Path(sys.argv[1])
staging = make_staging_dir(out)
(staging / "manifest.json").write_text("new")
rename = Path.rename
def rename_then_signal(self, target):
    moved = rename(self, target)
    if self == out:
        os.kill(os.getpid(), signal.SIGTERM)
    return moved
Path.rename = rename_then_signal
try:
    with sigterm_as_exit():
        move_into_place(staging, out, True, "--overwrite")
finally:
    if staging.exists():
        shutil.rmtree(staging)
"""


def test_sigterm_during_swap_keeps_bundle(tmp_path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "manifest.json").write_text("old")

    swap = subprocess.run(
        [sys.executable, "-c", _SWAP_INTERRUPTED, str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert swap.returncode == 143, swap.stderr
    # The swap finished before the signal took effect.
    assert (out / "manifest.json").read_text() == "new"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bundle"]


# Stages half a bundle next to OUT, as convert does, then dies as on SIGKILL.
_KILLED_CONVERT = """
import os, signal, sys
from pathlib import Path
from converters.output_dir import make_staging_dir
staging = make_staging_dir(Path(sys.argv[1]))
(staging / "student.tflite").write_bytes(b"half a model")
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_convert_deletes_staging_of_killed_writer(tmp_path, caplog) -> None:
    from converters.output_dir import prepare_output_dir

    if not Path("/proc/self/ns/pid").exists():
        pytest.skip("no /proc/self/ns/pid, so no PID namespace in the names")
    out = tmp_path / "bundle"
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_CONVERT, str(out)], timeout=60
    )
    assert killed.returncode == -signal.SIGKILL
    (stale,) = tmp_path.glob(".bundle-new-*")
    host = socket.gethostname()
    namespace = os.stat("/proc/self/ns/pid").st_ino
    dead = f"{host}-{killed_pid(stale)}-{namespace}"
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    kept = {
        # A conversion that still runs.
        "live": tmp_path / f".bundle-new-{host}-{running.pid}-{namespace}-ab12",
        # Named as a staging directory of the dead writer, but not one.
        "other files": tmp_path / f".bundle-new-{dead}-cd34",
        "file": tmp_path / f".bundle-new-{dead}-ef56",
        "symlink": tmp_path / f".bundle-new-{dead}-ab78",
        # Another PID namespace, such as a container with the host's name.
        "container": tmp_path / f".bundle-new-{host}-{killed_pid(stale)}-1-cd90",
        "unnamed": tmp_path / ".bundle-new-ab12cd34",
        # An earlier bundle that a swap killed midway had moved aside.
        "backup": tmp_path / ".bundle-old-ab_12",
    }
    for name, path in kept.items():
        if name == "file":
            path.write_text("user data")
        elif name == "symlink":
            path.symlink_to(kept["live"])
        else:
            path.mkdir()
    (kept["other files"] / "notes.txt").write_text("user data")
    (kept["backup"] / "manifest.json").write_text("earlier bundle")

    try:
        with caplog.at_level("INFO", logger="dslo_edge"):
            prepare_output_dir(out, overwrite=False)
    finally:
        running.kill()
        running.wait()

    assert not stale.exists()
    assert f"Deleted {stale}, left by process {killed_pid(stale)}" in caplog.text
    remaining = sorted(path.name for path in tmp_path.iterdir())
    assert remaining == sorted(path.name for path in kept.values())
    assert f"Kept {kept['live']}: process {running.pid}" in caplog.text
    assert "it contains notes.txt, which convert does not write" in caplog.text
    assert (kept["other files"] / "notes.txt").read_text() == "user data"
    assert kept["file"].read_text() == "user data"
    assert kept["symlink"].is_symlink()
    assert caplog.text.count("runs: it is not a directory") == 2
    for name in ("container", "unnamed"):
        assert f"{kept[name]} may be left by a killed dslo-edge convert" in (
            caplog.text
        )
    assert (kept["backup"] / "manifest.json").read_text() == "earlier bundle"


@pytest.mark.slow
def test_killed_convert_leaves_nothing_in_temp(keras_files, tmp_path) -> None:
    from converters.output_dir import prepare_output_dir

    temp = tmp_path / "temp"
    temp.mkdir()
    out = tmp_path / "out" / "bundle"
    command = [sys.executable, "-m", "dslo_edge.cli", *keras_files, "--out", str(out)]
    convert = subprocess.Popen(
        command,
        env={**os.environ, "TMPDIR": str(temp)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        saved_models: list[Path] = []
        deadline = time.monotonic() + 120
        while not saved_models and convert.poll() is None:
            assert time.monotonic() < deadline, "convert wrote no SavedModel in 120 s"
            saved_models = _saved_models(temp, out.parent)
            time.sleep(0.01)
        convert.kill()
    finally:
        convert.kill()
        convert.wait()

    assert convert.returncode == -signal.SIGKILL
    (saved_model,) = saved_models
    staging = saved_model.parent
    assert staging.parent == out.parent
    assert staging.name.startswith(".bundle-new-")
    assert list(temp.glob("dslo-convert-*")) == []

    prepare_output_dir(out, overwrite=False)

    assert not staging.exists()


def _saved_models(temp: Path, parent: Path) -> list[Path]:
    """Return the SavedModel folders that convert has written so far.

    convert renames or deletes its staging folder while this looks, and
    glob raises FileNotFoundError for a folder that went away meanwhile.
    That counts as none found yet.
    """
    try:
        return [
            *temp.glob("dslo-convert-*"),
            *parent.glob(".bundle-new-*/dslo-convert-*"),
        ]
    except FileNotFoundError:
        return []


def killed_pid(staging: Path) -> int:
    """Return the process id in the name of a convert staging directory."""
    return int(staging.name.rsplit("-", 3)[1])


def _folder_contents(folder: Path) -> dict[str, bytes]:
    """Return every file below ``folder`` by relative path, with its bytes."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _wait_for_last_checkpoint(folder: Path) -> None:
    """Wait until the daemon has made its idle saves after the last update.

    The daemon saves again training.checkpoint_idle_s (2 s) after the save
    that the push waited for, so 4 s without a new file means it is done.
    """
    deadline = time.monotonic() + 60
    names = sorted(folder.iterdir())
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < 4:
        assert time.monotonic() < deadline, "the daemon kept saving for 60 s"
        time.sleep(0.2)
        latest = sorted(folder.iterdir())
        if latest != names:
            names = latest
            quiet_since = time.monotonic()


def test_demo_leaves_running_daemon_alone(mlp_pair, mosquitto, tmp_path) -> None:
    pytest.importorskip("keras")
    pytest.importorskip("sklearn")
    out = tmp_path / "demo"
    out.mkdir()
    (out / ".dslo-demo").write_text("Written by dslo-edge demo; safe to delete.\n")
    bundle = out / "bundle"
    shutil.copytree(mlp_pair.bundle, bundle)
    config = out / "device.toml"
    config.write_text(
        render_config("demo-device", bundle, out / "state", mosquitto.port)
    )
    data = tmp_path / "samples.npz"
    x = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    np.savez(data, x=x)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "dslo_edge.cli", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # The daemon uses the demo's folder, as in the README's push example.
        pushed = run_cli(
            "push",
            f"--bundle={bundle}",
            f"--data={data}",
            "--device=demo-device",
            f"--broker={mosquitto.url}",
        )
        assert pushed.returncode == 0, pushed.stderr
        _wait_for_last_checkpoint(out / "state" / "checkpoints")
        before = _folder_contents(out)
        assert any(name.startswith("state/checkpoints/") for name in before)

        demo = run_cli("demo", f"--out={out}", "--broker=mosquitto")

        assert daemon.poll() is None
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
    assert demo.returncode == EXIT_CONFIG, demo.stderr
    assert demo.stderr == (
        f"error: {out / 'state'} is in use by a running dslo-edge daemon "
        f"(pid {daemon.pid}, device demo-device), and the demo would replace its "
        "bundle and checkpoints; stop that daemon, or choose another --out\n"
    )
    after = _folder_contents(out)
    after.pop("state/metrics.jsonl")
    before.pop("state/metrics.jsonl")
    assert after == before
