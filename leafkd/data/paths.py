"""Where the shared benchmark data lives: an explicit folder, $LEAFKD_DATA, else ../shared/data beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

from leafkd.errors import LeafkdError


def data_dir(explicit: str | Path | None = None, *, required: bool = True) -> Path | None:
    """The data folder: `explicit` (which must exist), else $LEAFKD_DATA, else ``../shared/data`` beside the working
    directory or the checkout. None when there is none and not ``required``."""
    if explicit:
        if not Path(explicit).is_dir():
            raise LeafkdError(f"{explicit}: no such data folder")
        return Path(explicit)
    candidates = [os.environ.get("LEAFKD_DATA"), Path.cwd().parent / "shared" / "data",
                  Path(__file__).resolve().parents[3] / "shared" / "data"]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    if required:
        raise LeafkdError("cannot find the data folder: pass --data-dir or set LEAFKD_DATA (expected ../shared/data)")
    return None
