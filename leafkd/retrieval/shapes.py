"""The few input shapes a query encoder runs: texts padded to a length bucket, CUDA-graph batches to a batch bucket.

Padding to buckets keeps the set of shapes small, so each is warmed up once at load time and, on CUDA, single
queries and small batches replay a CUDA graph captured per (batch bucket, length bucket).
"""

from __future__ import annotations

LENGTH_BUCKETS = (8, 16, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512)

# Batch sizes with a CUDA graph (a batch is padded up to the next one) for texts up to GRAPH_MAX_LEN tokens.
GRAPH_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)

GRAPH_MAX_LEN = 64


def length_bucket(n: int, max_length: int) -> int:
    """The padded length for a text of ``n`` tokens: the next bucket, capped at ``max_length``."""
    for b in LENGTH_BUCKETS:
        if b >= n:
            return min(b, max_length)
    return max_length


def length_buckets(max_length: int) -> list[int]:
    """Every padded length a model with ``max_length`` tokens can see."""
    return [b for b in LENGTH_BUCKETS if b < max_length] + [max_length]


def graph_shape(n: int, width: int) -> tuple[int, int] | None:
    """The (rows, width) graph that serves ``n`` texts padded to ``width``, or None when no graph covers it."""
    if n == 1:
        return (1, width)
    if width > GRAPH_MAX_LEN:
        return None
    for b in GRAPH_BATCHES:
        if b >= n:
            return (b, width)
    return None


def graph_shapes(width: int) -> list[tuple[int, int]]:
    """The graph shapes captured at warm-up for one padded length: single texts always, batches for short texts."""
    shapes = [(1, width)]
    if width <= GRAPH_MAX_LEN:
        shapes += [(b, width) for b in GRAPH_BATCHES if b > 1]
    return shapes
