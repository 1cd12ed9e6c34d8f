"""``Prefetch``: iterate on a background thread, a few items ahead; errors reach the caller."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator

_END = object()


def _produce(items: Iterator, out: queue.Queue, stop: threading.Event) -> None:
    """Worker thread: put (True, item)..., then (False, _END) or (False, exception)."""

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                out.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    try:
        for item in items:
            if not put((True, item)):
                return
        put((False, _END))
    except BaseException as error:  # re-raised in the consumer
        put((False, error))
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()


class Prefetch(Iterator):
    """Iterate ``items`` on a background thread, up to ``size`` items ahead.

    An exception in the thread is raised again by ``next()`` (same type and
    message). ``close()`` (also on ``with`` exit, on garbage collection, and
    once the items run out) stops the thread. ``size=0`` iterates in the
    caller's thread. ``position`` counts the items returned, from ``position``.
    """

    def __init__(self, items: Iterable, size: int = 2, *, position: int = 0):
        self.position = position
        self._items = iter(items)
        self._closed = False
        self._thread = None
        if size > 0:
            self._queue: queue.Queue = queue.Queue(maxsize=size)
            self._stop = threading.Event()
            # The thread must not hold a reference to self, so that dropping the
            # iterator (a `break` out of a for loop) closes it and ends the thread.
            self._thread = threading.Thread(
                target=_produce,
                args=(self._items, self._queue, self._stop),
                name="pali_kit-prefetch",
                daemon=True,
            )
            self._thread.start()

    def __next__(self):
        if self._closed:
            raise StopIteration
        if self._thread is None:
            try:
                item = next(self._items)
            except BaseException:
                self.close()
                raise
        else:
            ok, item = self._get()
            if not ok:
                self.close()
                if item is _END:
                    raise StopIteration
                raise item
        self.position += 1
        return item

    def _get(self):
        while True:
            try:
                return self._queue.get(timeout=0.1)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    return False, RuntimeError("the prefetch thread stopped without a result")

    def close(self) -> None:
        """Stop the background thread (waits up to 5 s for a batch in progress)."""
        if self._closed:
            return
        self._closed = True
        if self._thread is None:
            close = getattr(self._items, "close", None)
            if close is not None:
                close()
            return
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
