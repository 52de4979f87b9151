"""Load the compiled loops of the dynamic part, when the install built them.

``kernel`` is the extension module ``dslo_edge._dynamic_kernel`` (source
``_dynamic_kernel.c``): sample id lookups, and the entropy, monitor, smoothing
and alpha loops over one batch. It is None where the install could not build
it, for example on a device without a C compiler, or when the environment
sets ``DSLO_DYNAMIC_KERNEL=numpy``. Every caller then runs its numpy code,
which gives the same results, only slower.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

KERNEL_VARIABLE = "DSLO_DYNAMIC_KERNEL"


def _load() -> ModuleType | None:
    choice = os.environ.get(KERNEL_VARIABLE, "").strip().lower()
    if choice == "numpy":
        return None
    if choice not in ("", "compiled"):
        logging.getLogger(__name__).warning(
            "%s is %r, expected 'numpy' or 'compiled'; using the compiled "
            "loops where they are built",
            KERNEL_VARIABLE,
            choice,
        )
    try:
        from dslo_edge import _dynamic_kernel
    except ImportError:
        return None
    return _dynamic_kernel


kernel = _load()


def kernel_name() -> str:
    """Return ``compiled`` when the loops are built and enabled, else ``numpy``."""
    return "numpy" if kernel is None else "compiled"
