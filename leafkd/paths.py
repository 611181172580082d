"""Where the shared benchmark data lives: $LEAFKD_DATA, else ../shared/data beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

from leafkd.errors import LeafkdError


def data_dir(explicit: str | Path | None = None) -> Path:
    candidates = [explicit, os.environ.get("LEAFKD_DATA"), Path.cwd().parent / "shared" / "data",
                  Path(__file__).resolve().parents[2] / "shared" / "data"]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    raise LeafkdError("cannot find the data folder: pass --data-dir or set LEAFKD_DATA (expected ../shared/data)")
