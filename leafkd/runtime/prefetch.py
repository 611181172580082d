"""Background prefetching: build the next items of an iterator in a thread while the consumer works."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator


def prefetch(make: Callable[[int], dict], count: int, depth: int = 4) -> Iterator[dict]:
    """Build items 0..count-1 in a background thread, `depth` ahead of the consumer."""
    return prefetch_iter((make(k) for k in range(count)), depth)


def prefetch_iter(items: Iterator, depth: int = 4) -> Iterator:
    """Run the iterator `items` in a background thread, `depth` items ahead of the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def worker() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


