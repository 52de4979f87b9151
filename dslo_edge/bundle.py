"""Load a converted bundle on the device and verify it before use."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dslo_edge.errors import BundleError
from dslo_edge.manifest import check_manifest_keys, check_top_level
from dslo_edge.multihead_protocol import MultiHeadSpec
from dslo_edge.protocol import ModelSpec

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
STUDENT_SIGNATURES = ("infer", "train", "get_weights", "set_weights")


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A verified bundle directory and its manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def student_path(self) -> Path:
        return self.path / self.manifest["student"]["file"]

    @property
    def teacher_path(self) -> Path:
        return self.path / self.manifest["teacher"]["file"]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.manifest["input"]["shape"][1:])

    @property
    def class_count(self) -> int:
        """Class count of a single-head student.

        Raises:
            BundleError: the student has several heads, each with its own
                class count (``heads``).
        """
        if self.is_multi_head:
            names = ", ".join(self.heads)
            raise BundleError(
                f"the student in {self.path} has several heads ({names}) and no "
                "single class count; read Bundle.heads and train it with "
                "dslo_edge.multihead.MultiHeadTrainer"
            )
        return int(self.manifest["class_count"])

    @property
    def is_multi_head(self) -> bool:
        """True for a student converted with several outputs (heads)."""
        return "class_count" not in self.manifest and "heads" in self.manifest

    @property
    def heads(self) -> dict[str, int]:
        """Class count of each head, in output order; empty for one head."""
        if not self.is_multi_head:
            return {}
        return {
            str(head["name"]): int(head["class_count"])
            for head in self.manifest["heads"]
        }

    @property
    def teacher_output_kind(self) -> str:
        return str(self.manifest["teacher"].get("output_kind", "probabilities"))

    @property
    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        weights = self.manifest["student"]["weights"]
        return {name: tuple(shape) for name, shape in weights.items()}

    def model_spec(self) -> ModelSpec:
        """Return the shapes an update must match to train this student."""
        return ModelSpec(input_shape=self.input_shape, class_count=self.class_count)

    def multi_head_spec(self) -> MultiHeadSpec:
        """Return the shapes a multi-head update must match to train this student.

        Raises:
            BundleError: the student has one head; use ``model_spec``.
        """
        if not self.is_multi_head:
            raise BundleError(
                f"the student in {self.path} has one head; train it with "
                "dslo_edge.trainer.Trainer and single-head updates"
            )
        return MultiHeadSpec(input_shape=self.input_shape, heads=self.heads)


BUNDLE_MODELS = ("student", "teacher")


def manifest_files(manifest: dict[str, Any]) -> dict[str, str]:
    """Return the file name of each manifest entry that names a file, by key.

    These are the student, the teacher and the int8 copy, as written by
    ``dslo-edge convert``. The names are not checked here.
    """
    return {
        key: str(entry["file"])
        for key, entry in manifest.items()
        if isinstance(entry, dict) and "file" in entry
    }


def load_bundle(
    path: str | Path, *, verify: bool = True, models: tuple[str, ...] = BUNDLE_MODELS
) -> Bundle:
    """Read a bundle's manifest and check its files.

    Args:
        path: the bundle directory written by ``dslo-edge convert``.
        verify: compare each model file's sha256 with the manifest.
        models: the models whose files must be present, "student" and
            "teacher". The hub passes ``("teacher",)``, because it runs only
            the teacher. The whole manifest is checked either way.

    Raises:
        BundleError: a missing or unreadable manifest, a manifest that is not
            a JSON object or has a key of the wrong type, an unsupported
            format version, a missing signature, a missing file or a checksum
            mismatch.
    """
    folder = Path(path)
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(
            f"no {MANIFEST_NAME} in {folder}; expected a directory written by "
            "'dslo-edge convert'"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(
            f"{manifest_path} is not valid JSON ({error}); the copy is damaged "
            "or incomplete, so copy the whole bundle directory again, or write "
            "it again with 'dslo-edge convert'"
        ) from error
    except OSError as error:
        raise BundleError(f"cannot read {manifest_path}: {error}") from error
    manifest = check_top_level(manifest, manifest_path)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise BundleError(
            f"{manifest_path} has format_version {version!r}; this dslo-edge "
            f"reads version {FORMAT_VERSION}: convert the models again"
        )
    check_manifest_keys(manifest, manifest_path)
    bundle = Bundle(folder, manifest)
    _check_signatures(bundle)
    for role in models:
        _check_file(folder, role, manifest[role], verify)
    return bundle


def _check_signatures(bundle: Bundle) -> None:
    present = set(bundle.manifest["student"].get("signatures", {}))
    missing = [name for name in STUDENT_SIGNATURES if name not in present]
    if missing:
        raise BundleError(
            f"student in {bundle.path} lacks signatures {', '.join(missing)}; "
            "convert it again with 'dslo-edge convert'"
        )


def _check_file(folder: Path, role: str, entry: dict[str, Any], verify: bool) -> None:
    path = folder / entry["file"]
    if path.exists() and not path.is_file():
        raise BundleError(
            f"bundle file {path} is not a regular file, but {MANIFEST_NAME} names "
            f"it as the {role} model; copy the whole bundle directory again, or "
            "write it again with 'dslo-edge convert'"
        )
    if not path.is_file():
        raise BundleError(
            f"bundle file {path} is missing, but {MANIFEST_NAME} names it as the "
            f"{role} model; copy the whole bundle directory again, or write it "
            "again with 'dslo-edge convert'"
        )
    if path.stat().st_size == 0:
        raise BundleError(
            f"bundle file {path} is empty (0 bytes), but {MANIFEST_NAME} names it "
            f"as the {role} model; copy the whole bundle directory again, or "
            "write it again with 'dslo-edge convert'"
        )
    if verify:
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise BundleError(
                f"checksum mismatch for {path}: manifest has {entry['sha256']}, "
                f"file has {actual}; the copy is corrupt, so copy the bundle again"
            )
