"""Fixed choices: a str Enum whose `parse` turns a user's value into a member or a one-line error."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Self

from leafkd.errors import LeafkdError


class Choice(StrEnum):
    """An option with fixed choices. A `str`, so comparisons, JSON and result keys see its value."""

    @classmethod
    def parse(cls, value: Any, what: str) -> Self:
        """The member named by `value` (any case; a TOML boolean names true/false); anything else is a
        `LeafkdError` naming `what` and the choices."""
        if isinstance(value, cls):
            return value
        text = ("true" if value else "false") if isinstance(value, bool) else str(value).lower()
        try:
            return cls(text)
        except ValueError:
            names = [c.value for c in cls]
            raise LeafkdError(f"{what} must be {', '.join(names[:-1])} or {names[-1]}, not {value!r}") from None
