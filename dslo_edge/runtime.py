"""Pick a LiteRT interpreter package and run bundle models through it.

Devices have either ``ai-edge-litert`` (the maintained package, numpy 2) or
the older ``tflite-runtime`` 2.14 (numpy < 2 only); both expose the same
``Interpreter`` class and signature runners.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from dslo_edge.errors import BundleError, ConfigError, RuntimeMissing

logger = logging.getLogger(__name__)

RUNTIME_MODULES = {
    "ai-edge-litert": "ai_edge_litert.interpreter",
    "tflite-runtime": "tflite_runtime.interpreter",
}


def interpreter_class(preference: str = "auto") -> tuple[Any, str]:
    """Return the ``Interpreter`` class to use and the package it came from.

    Args:
        preference: "auto" (ai-edge-litert first, then tflite-runtime) or one
            of the package names in ``RUNTIME_MODULES``.

    Raises:
        ConfigError: unknown preference.
        RuntimeMissing: no interpreter package is installed.
    """
    if preference == "auto":
        candidates = list(RUNTIME_MODULES)
    elif preference in RUNTIME_MODULES:
        candidates = [preference]
    else:
        raise ConfigError(
            f"unknown runtime '{preference}'; expected auto, "
            + " or ".join(RUNTIME_MODULES)
        )
    errors = []
    for name in candidates:
        try:
            module = importlib.import_module(RUNTIME_MODULES[name])
        except ImportError as error:
            errors.append(f"{name}: {error}")
            continue
        return module.Interpreter, name
    packages = " or ".join(f"pip install {name}" for name in candidates)
    raise RuntimeMissing(
        "no LiteRT interpreter could be imported ("
        + "; ".join(errors)
        + f"); install one with: {packages}"
    )


def load_interpreter(
    model_path: str | Path | None = None,
    model_content: bytes | None = None,
    preference: str = "auto",
) -> Any:
    """Create an interpreter for a model file or model bytes.

    Raises:
        BundleError: the model is empty or the interpreter cannot load it.
    """
    cls, _ = interpreter_class(preference)
    if _is_empty(model_path, model_content):
        # For empty bytes LiteRT reports that no model was given at all.
        raise BundleError("the model file is empty (0 bytes)")
    try:
        if model_content is not None:
            return cls(model_content=model_content, num_threads=1)
        return cls(model_path=str(model_path), num_threads=1)
    except (ValueError, RuntimeError, SystemError) as error:
        raise BundleError(f"the interpreter cannot load the model: {error}") from error


def _is_empty(model_path: str | Path | None, model_content: bytes | None) -> bool:
    if model_content is not None:
        return not model_content
    try:
        return Path(str(model_path)).stat().st_size == 0
    except OSError:
        # The interpreter reports a missing or unreadable file.
        return False


def is_numeric(array: np.ndarray) -> bool:
    """Check that an array contains booleans, integers or floats.

    Strings, bytes, complex numbers and dates are not numeric here.
    """
    return array.dtype.kind in "biuf"


def as_float32(array: Any) -> np.ndarray:
    """Return a C-contiguous float32 view or copy, as the interpreter expects.

    Scalars keep shape (): ``np.ascontiguousarray`` would make them (1,),
    which scalar weights such as an optimizer's step count do not accept.
    """
    return np.asarray(array, dtype=np.float32, order="C")
