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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dslo_edge.bundle import MANIFEST_NAME, load_bundle
from dslo_edge.errors import BundleError, ConfigError, RuntimeMissing
from dslo_edge.hub_config import TeacherSettings, describe_multi_head_output_kind
from dslo_edge.hub_multihead import MultiHeadTeacherModel, head_output_kinds
from dslo_edge.hub_state import HubState
from dslo_edge.models import TeacherModel, read_teacher
from dslo_edge.push_checks import check_output_kinds
from dslo_edge.watchdog import Heartbeat

# The teacher of a single-head or of a multi-head student.
AnyTeacherModel = TeacherModel | MultiHeadTeacherModel

logger = logging.getLogger(__name__)

# Samples per teacher call when the hub labels a whole dataset or batch, with a
# watchdog beat after each call. At the default hub.watchdog_stall_s of 300 s,
# a teacher that takes more than about 1 s per sample trips the watchdog.
LABEL_CHUNK_SAMPLES = 256


@dataclass(frozen=True)
class TeacherVersion:
    """One version of the teacher: its file, identity and round."""

    file: Path
    # The output kind of a single-head teacher, "" for a multi-head one.
    output_kind: str
    identity: str  # sha256 of the teacher file
    version: str  # at most 64 bytes, sent in every update
    round: int
    loaded_at: float
    # The file's bytes as loaded. Other threads build their models from these,
    # because the file may have been replaced since by a teacher that was not
    # loaded.
    content: bytes = field(default=b"", repr=False, compare=False)
    # Each head's output kind for the teacher of a student with several
    # heads, or None for a student with one head.
    head_output_kinds: dict[str, str] | None = field(default=None, hash=False)

    def new_model(self, runtime: str = "auto") -> AnyTeacherModel:
        """Return a new interpreter of this version, for a thread of its own."""
        resolved = _ResolvedTeacher(self.file, self.output_kind, self.head_output_kinds)
        return _new_model(resolved, self.content, runtime)

    def announcement(self) -> str:
        """Return the JSON text of the retained teacher announcement.

        It has ``output_kind`` for a single-head teacher, and ``output_kinds``
        (the kind per head) for a multi-head one.
        """
        kinds: dict[str, Any] = {"output_kind": self.output_kind}
        if self.head_output_kinds is not None:
            kinds = {"output_kinds": self.head_output_kinds}
        return json.dumps(
            {
                "version": self.version,
                "round": self.round,
                "sha256": self.identity,
                **kinds,
                "loaded_at": self.loaded_at,
            }
        )


@dataclass(frozen=True)
class _ResolvedTeacher:
    """The teacher file that ``teacher.path`` names, and its output kinds."""

    file: Path
    output_kind: str
    head_output_kinds: dict[str, str] | None = None

    @property
    def tensor_output_kinds(self) -> dict[str, str]:
        """Return the expected output kind per teacher output tensor."""
        if self.head_output_kinds is None:
            return {"output": self.output_kind}
        return {f"output_{h}": kind for h, kind in self.head_output_kinds.items()}


def _resolve(settings: TeacherSettings) -> _ResolvedTeacher:
    """Return the teacher file and output kinds; checks a bundle's checksums.

    Raises:
        BundleError: the bundle is invalid.
        ConfigError: the output kind is not set for a model file, or the set
            kind contradicts the bundle's manifest.
    """
    path = settings.path
    if path.is_dir():
        bundle = load_bundle(path, models=("teacher",))
        if bundle.is_multi_head:
            problem = describe_multi_head_output_kind(settings, bundle.heads)
            if problem is not None:
                raise ConfigError(f"{problem} and restart the hub")
            return _ResolvedTeacher(
                bundle.teacher_path, "", head_output_kinds(bundle.manifest)
            )
        _check_output_kind(settings, bundle.teacher_output_kind)
        return _ResolvedTeacher(bundle.teacher_path, bundle.teacher_output_kind)
    # The config check at start requires the path, so only a running worker
    # gets here after the directory or file was removed or renamed.
    if not path.exists():
        raise BundleError(
            f"teacher.path {path} does not exist; put the bundle directory or "
            "teacher file back, or set teacher.path to its new place and "
            "restart the worker"
        )
    if settings.output_kind is None:
        raise ConfigError(
            f"missing teacher.output_kind, which teacher.path {path} needs "
            "because it is a model file, not a bundle whose manifest names the "
            "kind; set it to 'probabilities' or 'logits'"
        )
    return _ResolvedTeacher(path, settings.output_kind)


def _new_model(
    resolved: _ResolvedTeacher, content: bytes, runtime: str
) -> AnyTeacherModel:
    """Load the teacher ``content`` of the file that ``resolved`` names.

    Raises:
        BundleError: ``content`` is not a LiteRT model.
        ConfigError: the model lacks the teacher signature or an output.
    """
    if resolved.head_output_kinds is not None:
        return MultiHeadTeacherModel(
            resolved.file, resolved.head_output_kinds, runtime, content=content
        )
    return TeacherModel(
        resolved.file,
        resolved.output_kind,
        runtime,
        content=content,
        source=f"teacher.path {resolved.file}",
    )


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
    settings: TeacherSettings, resolved: _ResolvedTeacher, content: bytes
) -> None:
    """Raise ConfigError when a teacher's output op contradicts its output kind."""
    is_bundle = settings.path.is_dir()
    if is_bundle:
        kind_source = f"the manifest's teacher output kind in {settings.path}"
    else:
        kind_source = "teacher.output_kind"
    check_output_kinds(
        content,
        resolved.tensor_output_kinds,
        f"teacher.path {resolved.file}",
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
        resolved = _resolve(self.settings)
        content = read_teacher(resolved.file)
        _check_graph_kind(self.settings, resolved, content)
        return self._version(resolved, _sha256(content), content)

    def _version(
        self, resolved: _ResolvedTeacher, identity: str, content: bytes
    ) -> TeacherVersion:
        file = resolved.file
        name = self.settings.path.name if self.settings.path.is_dir() else file.stem
        version = f"{name[:50]}-{identity[:12]}"
        return TeacherVersion(
            file,
            resolved.output_kind,
            identity,
            version,
            self.state.teacher_round(identity, version),
            time.time(),
            content,
            resolved.head_output_kinds,
        )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample of the current teacher."""
        return _shapes(self._model)[0]

    @property
    def class_count(self) -> int:
        """Class count of the current teacher, which must have one head.

        Raises:
            ConfigError: the teacher has several heads.
        """
        return self._single_head_model().class_count

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Run the current teacher, which must have one head, on a batch.

        Raises:
            ConfigError: the teacher has several heads.
        """
        return self._single_head_model().predict(x)

    def _single_head_model(self) -> TeacherModel:
        if not isinstance(self._model, TeacherModel):
            raise ConfigError(
                f"the teacher at {self.settings.path} has several heads, and "
                "label requests are served for single-head teachers only; set "
                "requests.enabled = false, so that the worker runs only the "
                "[[push]] schedules"
            )
        return self._model

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
            resolved = _resolve(self.settings)
            file = resolved.file
            content = read_teacher(file)
            _check_graph_kind(self.settings, resolved, content)
            identity = _sha256(content)
            model = _new_model(resolved, content, self.settings.runtime)
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
                "Teacher at %s takes inputs %s and gives %s, but %s takes "
                "%s and gives %s; keeping %s. A new teacher must fit the same "
                "student: restart the hub to change models",
                file,
                shapes[0],
                _describe_classes(shapes[1]),
                self.current.version,
                current_shapes[0],
                _describe_classes(current_shapes[1]),
                self.current.version,
            )
            return False
        # The round lookup can fail, for example while another process holds
        # the state file's lock. The fingerprint is set only after it, so the
        # next poll tries this file again.
        candidate = self._version(resolved, identity, content)
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


def predict_in_chunks(
    predict: Callable[[np.ndarray], Any], x: np.ndarray, progress: Heartbeat
) -> Any:
    """Return ``predict(x)``, called on chunks of ``x`` with a beat after each.

    ``predict`` returns an array, or a dict of arrays (one per head), with
    one row per sample. The chunks' results are joined in order.
    """
    if len(x) <= LABEL_CHUNK_SAMPLES:
        outputs = predict(x)
        progress.beat()
        return outputs
    parts = []
    for start in range(0, len(x), LABEL_CHUNK_SAMPLES):
        parts.append(predict(x[start : start + LABEL_CHUNK_SAMPLES]))
        progress.beat()
    if isinstance(parts[0], dict):
        heads = parts[0]
        return {name: np.concatenate([part[name] for part in parts]) for name in heads}
    return np.concatenate(parts)


def _sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _shapes(model: AnyTeacherModel) -> tuple[tuple[int, ...], dict[str, int]]:
    """Return a teacher's input shape per sample and its class count per head.

    A single-head teacher has one head, named "".
    """
    if isinstance(model, TeacherModel):
        return model.input_shape, {"": model.class_count}
    return model.input_shape, model.class_counts


def _describe_classes(class_counts: dict[str, int]) -> str:
    """Describe class counts, such as "5 classes" for a single-head teacher."""
    if list(class_counts) == [""]:
        return f"{class_counts['']} classes"
    counts = ", ".join(f"{name} {count}" for name, count in class_counts.items())
    return f"the heads {counts} (classes per head)"
