"""Read ahead: a function of each item, computed on background threads, handed out in order.

The feature loader reads batches this way (so decompression and host-to-device copies overlap
the training step), and extraction reads its next batch of pixels while the current one runs
through the encoder.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

__all__ = ["prefetched"]


def prefetched(read: Callable, items: Iterable, threads: int = 1, ahead: int = 4,
               name: str = "featinv-read") -> Iterator:
    """``read`` of each of ``items``, in order, on ``threads`` background threads, ``ahead`` items ahead.

    An exception in ``read`` is raised here, in the consumer; closing the iterator stops the
    reading (a read in progress finishes first).
    """
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(read, item))
            if len(pending) > ahead + threads - 1:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True)
