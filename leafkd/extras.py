"""Optional extras, checked when the subpackage that needs one is imported (as model2vec does)."""

from __future__ import annotations

import importlib.util

from leafkd.errors import LeafkdError


class MissingExtraError(LeafkdError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(modules: list[str], extra: str, what: str) -> None:
    """Raise `MissingExtraError` unless every module in `modules` can be imported."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(f"{what} needs {', '.join(missing)}: pip install 'leafkd[{extra}]'")
