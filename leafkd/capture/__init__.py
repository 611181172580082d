"""Capture: the teacher's vectors of a corpus, computed once into a resumable, checksummed store."""

from leafkd.capture.store import VectorStore
from leafkd.capture.teacher import capture, capture_blackbox, check_store_for_teacher

__all__ = ["VectorStore", "capture", "capture_blackbox", "check_store_for_teacher"]
