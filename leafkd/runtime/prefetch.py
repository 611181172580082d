"""Background prefetching: build the next items of an iterator in a thread while the consumer works."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


def prefetch(make: Callable[[int], T], count: int, depth: int = 4) -> Iterator[T]:
    """Build items 0..count-1 in a background thread, `depth` ahead of the consumer."""
    return prefetch_iter((make(k) for k in range(count)), depth)


def prefetch_iter(items: Iterator[T], depth: int = 4) -> Iterator[T]:
    """Run the iterator `items` in a background thread, `depth` items ahead of the consumer."""
    # Each item travels in a 1-tuple, so that None can mean "no more items" and an exception "the producer failed".
    q: queue.Queue[tuple[T] | BaseException | None] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def worker() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put((item,))
            q.put(None)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    try:
        while True:
            entry = q.get()
            if entry is None:
                return
            if isinstance(entry, BaseException):
                raise entry
            yield entry[0]
    finally:
        stop.set()
