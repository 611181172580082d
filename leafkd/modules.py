"""sentence-transformers' module classes, from wherever the installed release keeps them (6.1 moved them)."""

from __future__ import annotations

try:
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Router, Transformer
except ImportError:  # pragma: no cover - sentence-transformers < 6.1
    # Their home before 6.1 (mypy checks against the installed release, which has the one above).
    from sentence_transformers.models import Dense, Normalize, Pooling, Router, Transformer  # type: ignore[no-redef]

__all__ = ["Dense", "Normalize", "Pooling", "Router", "Transformer", "is_mean_pooling"]

# sentence-transformers < 6.1 keeps one flag per pooling mode; mean pooling is the mean flag alone.
_OTHER_MODE_FLAGS = ("pooling_mode_cls_token", "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                     "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")


def is_mean_pooling(module: object) -> bool:
    """Whether a Pooling module does plain mean pooling and nothing else (the packed and fused forwards' pooling)."""
    mode = getattr(module, "pooling_mode", None)
    if isinstance(mode, (list, tuple)) and len(mode) == 1:
        mode = mode[0]
    if mode == "mean":
        return True
    if isinstance(mode, str) or mode is not None:
        return False
    return (bool(getattr(module, "pooling_mode_mean_tokens", False))
            and not any(getattr(module, a, False) for a in _OTHER_MODE_FLAGS))
