"""sentence-transformers' module classes, from wherever the installed release keeps them (6.1 moved them)."""

from __future__ import annotations

try:
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Router, Transformer
except ImportError:  # pragma: no cover - sentence-transformers < 6.1
    # Their home before 6.1 (mypy checks against the installed release, which has the one above).
    from sentence_transformers.models import Dense, Normalize, Pooling, Router, Transformer  # type: ignore[no-redef]

__all__ = ["Dense", "Normalize", "Pooling", "Router", "Transformer"]
