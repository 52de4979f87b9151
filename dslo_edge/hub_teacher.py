"""Teacher versions on the hub: find the current file, number it, reload it.

The configured path is a bundle directory or a ``.tflite`` file. A new
version is a changed file (a new sha256). The hub checks the file's size and
modification time every ``reload_poll_s`` and on SIGHUP, and hashes it only
when they changed. Each new version gets the next round from the shared
state, so all workers agree on it, and is announced on the retained
``<prefix>/_hub/teacher`` topic.

Replace a teacher file by writing the new one next to the old one and
renaming it into place. rename(2) cannot replace a directory that has files,
so a bundle is swapped by replacing a symbolic link to it. A bundle whose
checksum does not match its manifest (a copy still in progress) is skipped
with a warning and tried again at the next poll, and the old version stays
in use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dslo_edge.bundle import MANIFEST_NAME, load_bundle
from dslo_edge.errors import BundleError, ConfigError, RuntimeMissing
from dslo_edge.hub_config import TeacherSettings
from dslo_edge.hub_state import HubState
from dslo_edge.models import TeacherModel, read_teacher
from dslo_edge.push_checks import check_output_kinds

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherVersion:
    """One version of the teacher: its file, identity and round."""

    file: Path
    output_kind: str
    identity: str  # sha256 of the teacher file
    version: str  # at most 64 bytes, sent in every update
    round: int
    loaded_at: float
    # The file's bytes as loaded. Other threads build their models from these,
    # because the file may have been replaced since by a teacher that was not
    # loaded.
    content: bytes = field(default=b"", repr=False, compare=False)

    def new_model(self, runtime: str = "auto") -> TeacherModel:
        """Return a new interpreter of this version, for a thread of its own."""
        return TeacherModel(
            self.file,
            self.output_kind,
            runtime,
            content=self.content,
            source=f"teacher.path {self.file}",
        )

    def announcement(self) -> str:
        """Return the JSON text of the retained teacher announcement."""
        return json.dumps(
            {
                "version": self.version,
                "round": self.round,
                "sha256": self.identity,
                "output_kind": self.output_kind,
                "loaded_at": self.loaded_at,
            }
        )


def _resolve(settings: TeacherSettings) -> tuple[Path, str]:
    """Return the teacher file and output kind; checks a bundle's checksums.

    Raises:
        BundleError: the bundle is invalid.
        ConfigError: the output kind is not set for a model file, or the set
            kind contradicts the bundle's manifest.
    """
    path = settings.path
    if path.is_dir():
        bundle = load_bundle(path, models=("teacher",))
        _check_output_kind(settings, bundle.teacher_output_kind)
        return bundle.teacher_path, bundle.teacher_output_kind
    if settings.output_kind is None:
        raise ConfigError(f"teacher.output_kind is needed for the file {path}")
    return path, settings.output_kind


def _check_output_kind(settings: TeacherSettings, manifest_kind: str) -> None:
    """Raise ConfigError when teacher.output_kind contradicts a bundle's manifest.

    The configuration check at start-up covers the first bundle only. A bundle
    swapped in later must pass the same check, or the hub would mark its
    probabilities as logits, or the reverse.
    """
    configured = settings.output_kind
    if configured is None or configured == manifest_kind:
        return
    raise ConfigError(
        f"teacher.output_kind = {configured!r} contradicts the bundle "
        f"{settings.path}, whose manifest says its teacher outputs "
        f"{manifest_kind!r}; remove teacher.output_kind, which only a .tflite "
        "teacher file needs, and restart the hub"
    )


def _check_graph_kind(
    settings: TeacherSettings, file: Path, output_kind: str, content: bytes
) -> None:
    """Raise ConfigError when the teacher's output op contradicts its output kind."""
    is_bundle = settings.path.is_dir()
    if is_bundle:
        kind_source = f"the manifest's teacher output kind in {settings.path}"
    else:
        kind_source = "teacher.output_kind"
    check_output_kinds(
        content,
        {"output": output_kind},
        f"teacher.path {file}",
        kind_source,
        kind_is_setting=not is_bundle,
    )


def _load_error(path: Path, error: BundleError) -> ConfigError:
    """Return the start-up error for a teacher that cannot be loaded."""
    fix = ""
    if path.is_file() and path.stat().st_size == 0:
        fix = (
            "; point teacher.path at a .tflite file that 'dslo-edge convert' "
            "wrote, or convert the teacher again"
        )
    elif path.is_file():
        fix = (
            "; expected a .tflite model file or a bundle directory written by "
            "'dslo-edge convert'"
        )
    return ConfigError(f"cannot load teacher.path {path}: {error}{fix}")


def _fingerprint(settings: TeacherSettings) -> tuple[Any, ...]:
    """Return what changes when the teacher is replaced, without hashing."""
    path = settings.path
    watched = path / MANIFEST_NAME if path.is_dir() else path
    try:
        stat = watched.stat()
    except OSError:
        return ("missing",)
    return (path.resolve(), stat.st_mtime_ns, stat.st_size, stat.st_ino)


class TeacherRegistry:
    """The current teacher version of one worker, reloaded when it changes.

    ``model`` and ``predict`` may be called from one thread only, because a
    LiteRT interpreter is not thread-safe. Other threads keep their own
    ``TeacherModel`` for ``current``.
    """

    def __init__(self, settings: TeacherSettings, state: HubState):
        """Load the configured teacher as the first version.

        Raises:
            ConfigError: the teacher cannot be loaded. A restart would not
                repair the file, so the worker exits with status 78.
        """
        self.settings = settings
        self.state = state
        try:
            self.current = self._load()
            self._model = self.current.new_model(settings.runtime)
        except RuntimeMissing:
            raise
        except BundleError as error:
            raise _load_error(settings.path, error) from error
        self._fingerprint = _fingerprint(settings)
        self._next_poll = time.monotonic() + settings.reload_poll_s
        # (fingerprint, error text) of the last failed load, logged once.
        self._failure: tuple[Any, ...] | None = None

    def _load(self) -> TeacherVersion:
        file, output_kind = _resolve(self.settings)
        content = read_teacher(file)
        _check_graph_kind(self.settings, file, output_kind, content)
        return self._version(file, output_kind, _sha256(content), content)

    def _version(
        self, file: Path, output_kind: str, identity: str, content: bytes
    ) -> TeacherVersion:
        name = self.settings.path.name if self.settings.path.is_dir() else file.stem
        version = f"{name[:50]}-{identity[:12]}"
        return TeacherVersion(
            file,
            output_kind,
            identity,
            version,
            self.state.teacher_round(identity, version),
            time.time(),
            content,
        )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample of the current teacher."""
        return _shapes(self._model)[0]

    @property
    def class_count(self) -> int:
        """Class count of the current teacher."""
        return _shapes(self._model)[1]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Run the current teacher on a batch."""
        return self._model.predict(x)

    def reload_if_changed(self, force: bool = False) -> bool:
        """Load a new version if the file changed; return True if one was loaded.

        Without ``force`` it looks at the file only every ``reload_poll_s``.
        """
        now = time.monotonic()
        if not force and now < self._next_poll:
            return False
        self._next_poll = now + self.settings.reload_poll_s
        fingerprint = _fingerprint(self.settings)
        if fingerprint == self._fingerprint and not force:
            return False
        try:
            file, output_kind = _resolve(self.settings)
            content = read_teacher(file)
            _check_graph_kind(self.settings, file, output_kind, content)
            identity = _sha256(content)
            model = TeacherModel(
                file,
                output_kind,
                self.settings.runtime,
                content=content,
                source=f"teacher.path {file}",
            )
            shapes = _shapes(model)
        except (BundleError, ConfigError, OSError, ValueError, KeyError) as error:
            self._log_failure(fingerprint, error, force)
            return False
        self._failure = None
        if identity == self.current.identity:
            self._fingerprint = fingerprint
            return False
        current_shapes = _shapes(self._model)
        if shapes != current_shapes:
            # Remembered, so the same file is not checked and logged again.
            self._fingerprint = fingerprint
            logger.error(
                "Teacher at %s takes inputs %s and gives %d classes, but %s takes "
                "%s and gives %d; keeping %s. A new teacher must fit the same "
                "student: restart the hub to change models",
                file,
                shapes[0],
                shapes[1],
                self.current.version,
                *current_shapes,
                self.current.version,
            )
            return False
        # The round lookup can fail, for example while another process holds
        # the state file's lock. The fingerprint is set only after it, so the
        # next poll tries this file again.
        candidate = self._version(file, output_kind, identity, content)
        self._fingerprint = fingerprint
        self._model = model
        logger.info(
            "Teacher %s (round %d) replaces %s (round %d)",
            candidate.version,
            candidate.round,
            self.current.version,
            self.current.round,
        )
        self.current = candidate
        return True

    def _log_failure(self, fingerprint: Any, error: Exception, force: bool) -> None:
        """Log a failed load unless the same file failed the same way last poll.

        A broken file is loaded again at every poll, because a bundle copy in
        progress leaves the manifest unchanged. Only a changed file, a new
        error or a SIGHUP logs the failure again.
        """
        failure = (fingerprint, str(error))
        repeated = failure == self._failure and not force
        self._failure = failure
        logger.log(
            logging.DEBUG if repeated else logging.WARNING,
            "Teacher at %s is not loadable (%s); keeping %s and trying again "
            "every %g s, logging again when the file or the error changes",
            self.settings.path,
            error,
            self.current.version,
            self.settings.reload_poll_s,
        )


def _sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _shapes(model: TeacherModel) -> tuple[tuple[int, ...], int]:
    """Return a teacher's input shape per sample and its class count."""
    return model.input_shape, model.class_count
