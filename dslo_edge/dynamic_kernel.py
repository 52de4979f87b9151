"""Load the compiled loops of the dynamic part, when the install built them.

``kernel`` is the extension module ``dslo_edge._dynamic_kernel`` (source
``_dynamic_kernel.c``): sample id lookups, and the entropy, monitor, smoothing
and alpha loops over one batch. It is None where the install could not build
it, for example on a device without a C compiler, or when the environment
sets ``DSLO_DYNAMIC_KERNEL=numpy``. Every caller then runs its numpy code,
which gives the same results, only slower.
"""

from __future__ import annotations

from dslo_edge.extensions import load_extension

KERNEL_VARIABLE = "DSLO_DYNAMIC_KERNEL"

kernel = load_extension("_dynamic_kernel", KERNEL_VARIABLE, "numpy")


def kernel_name() -> str:
    """Return ``compiled`` when the loops are built and enabled, else ``numpy``."""
    return "numpy" if kernel is None else "compiled"
