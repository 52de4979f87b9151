"""Load the optional compiled extensions that the install may have built.

``pip install`` builds them only where a C compiler and the Python headers
are found. Each has a Python or numpy counterpart that gives the same
results, and an environment variable selects that counterpart on purpose.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

logger = logging.getLogger(__name__)


def load_extension(name: str, variable: str, fallback: str) -> ModuleType | None:
    """Import the extension ``dslo_edge.<name>``, or return None.

    None means the caller runs its Python or numpy code: the environment
    sets ``variable`` to ``fallback``, or the install did not build the
    extension. Another value than ``fallback`` or ``compiled`` is logged.
    """
    choice = os.environ.get(variable, "").strip().lower()
    if choice == fallback:
        return None
    if choice not in ("", "compiled"):
        logger.warning(
            "%s is %r, expected %r or 'compiled'. Using the compiled code "
            "where it is built",
            variable,
            choice,
            fallback,
        )
    try:
        return importlib.import_module(f"dslo_edge.{name}")
    except ImportError:
        return None
