"""Load the compiled loops of the dynamic part, when the install built them.

``kernel`` is the extension module ``dslo_edge._dynamic_kernel`` (source
``_dynamic_kernel.c``): sample id lookups, and the entropy, monitor, smoothing
and alpha loops over one batch. It is None where the install could not build
it, for example on a device without a C compiler, or when the environment
sets ``DSLO_DYNAMIC_KERNEL=numpy``, or when the module was built from an
older source (``checked_kernel``). Every caller then runs its numpy code,
which gives the same results, only slower.
"""

from __future__ import annotations

import logging
from types import ModuleType

from dslo_edge.extensions import load_extension

logger = logging.getLogger(__name__)

KERNEL_VARIABLE = "DSLO_DYNAMIC_KERNEL"
# The API_VERSION of _dynamic_kernel.c whose arguments this package passes.
KERNEL_API_VERSION = 2


def checked_kernel(module: ModuleType | None) -> ModuleType | None:
    """Return ``module`` if it was built from the current source, else None.

    A module built from an older ``_dynamic_kernel.c``, which an editable
    install keeps until it is rebuilt, takes other arguments. Every call would
    then fail and fall back to numpy while ``kernel_name`` returned "compiled".
    """
    if module is None:
        return None
    built = getattr(module, "API_VERSION", None)
    if built == KERNEL_API_VERSION:
        return module
    logger.warning(
        "The compiled loops in %s were built from another version of "
        "_dynamic_kernel.c (API_VERSION %s, expected %d), so the numpy code "
        "runs; reinstall dslo-edge, such as with 'pip install -e .', to rebuild "
        "them",
        getattr(module, "__file__", module.__name__),
        built,
        KERNEL_API_VERSION,
    )
    return None


kernel = checked_kernel(load_extension("_dynamic_kernel", KERNEL_VARIABLE, "numpy"))


def kernel_name() -> str:
    """Return ``compiled`` when the loops are built and enabled, else ``numpy``."""
    return "numpy" if kernel is None else "compiled"
