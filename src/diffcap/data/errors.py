"""The error every bad-input problem of the data contract raises, and how it names many items."""

from __future__ import annotations

_MAX_NAMED = 5


class DataError(ValueError):
    """Bad input data; the message names the file, and the line or item where known."""


def describe_ids(ids: list[str]) -> str:
    """Name at most five ids plus the total, for error messages about many items."""
    shown = ", ".join(repr(i) for i in ids[:_MAX_NAMED])
    more = f" and {len(ids) - _MAX_NAMED} more" if len(ids) > _MAX_NAMED else ""
    return f"{len(ids)} id(s): {shown}{more}"
