"""Capture: the teacher's vectors of a corpus, computed once into a resumable, checksummed store.

Its names load on first use (PEP 562), so importing the subpackage loads no torch: `leafkd/__init__.py` imports it
first thing, which keeps `leafkd.capture` the public function (see there).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from leafkd.lazy import lazy_names

_NAMES = {
    "VectorStore": "leafkd.capture.store",
    "capture": "leafkd.capture.teacher",
    "capture_blackbox": "leafkd.capture.teacher",
    "check_store_for_teacher": "leafkd.capture.teacher",
}

if TYPE_CHECKING:
    from leafkd.capture.store import VectorStore
    from leafkd.capture.teacher import capture, capture_blackbox, check_store_for_teacher


__getattr__ = lazy_names(__name__, globals(), _NAMES)


__all__ = ["VectorStore", "capture", "capture_blackbox", "check_store_for_teacher"]
