"""Parse JSON from files and messages that another program wrote."""

from __future__ import annotations

import json
from typing import Any


def parse_json(text: str | bytes | bytearray) -> Any:
    """Parse JSON text, raising ValueError for any text that is not readable JSON.

    ``json.loads`` raises ``JSONDecodeError`` and ``UnicodeDecodeError``, both
    ValueErrors, and also a plain ValueError for an int of more digits than
    ``sys.get_int_max_str_digits()``. It raises RecursionError for arrays or
    objects nested deeper than the recursion limit, which this turns into a
    ValueError too. In a paho callback any of them would end the network thread.

    Raises:
        ValueError: the text is not valid JSON that Python can read.
    """
    try:
        return json.loads(text)
    except RecursionError as error:
        raise ValueError(f"nested too deeply to parse ({error})") from None
