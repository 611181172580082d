"""``leafkd.json``: what a student folder records beside its model (teacher, losses, data, metrics).

It is the one file that ties a student to its teacher: the serving side refuses a student whose recorded teacher
fingerprint is not the index's, evaluation finds the teacher and the base model there, export checks it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from leafkd import atomic
from leafkd.errors import LeafkdError

INFO_FILE = "leafkd.json"


def read_student_info(folder: str | Path) -> dict[str, Any]:
    """A student folder's ``leafkd.json`` ({} when there is none); a malformed file is a one-line error."""
    path = Path(folder) / INFO_FILE
    if not path.exists():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise LeafkdError(f"{path}: unreadable ({e})") from None
    if not isinstance(info, dict):
        raise LeafkdError(f"{path}: not a JSON object")
    return info


def write_student_info(folder: str | Path, info: dict[str, Any]) -> None:
    """Write ``leafkd.json`` into a (model) folder, atomically."""
    atomic.write_json(Path(folder) / INFO_FILE, info)
