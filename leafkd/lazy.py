"""Names of a package imported on first use (PEP 562), so importing the package stays light (no torch)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_names(package: str, namespace: dict[str, Any], names: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for `package`: a name of `names` (name -> defining module) is imported on first
    use and cached in `namespace` (the package's ``globals()``); any other name is an AttributeError."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(names[name]), name)
        namespace[name] = value
        return value

    return __getattr__
