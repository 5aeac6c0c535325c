"""A thread that writes pseudo labels into a store, so PNG encoding and ``fsync`` overlap the next batch on the device.

The store's writes stay what they are (each file atomic, then journaled) and happen in the order given, from one
thread. The queue is bounded, so the labels waiting in memory stay few. An error in the thread is raised in the
labeling loop at its next label, or when the writer is closed; a kill loses only labels not written yet, which the
store reports as pending, so a relaunch labels them again.
"""

from __future__ import annotations

import queue
import threading

MAX_PENDING_LABELS = 16
_CLOSE = object()


class BackgroundLabelWriter:
    """``store.put(image_id, label)`` from a background thread; use as a context manager (closing waits for every
    queued label and raises the first error of the thread).

    Args:
        store: a :class:`~stpp_hf.data.PseudoLabelStore`.
        max_pending: labels queued at most before :meth:`put` waits for the thread.
    """

    def __init__(self, store, max_pending: int = MAX_PENDING_LABELS):
        self.store = store
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._write_queued, name="pseudo-label-writer", daemon=True)
        self._thread.start()

    def _write_queued(self) -> None:
        while (item := self._queue.get()) is not _CLOSE:
            if self._error is None:  # after a failure the rest stays pending in the store
                try:
                    self.store.put(*item)
                except BaseException as error:  # raised in the labeling loop
                    self._error = error

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, image_id: str, label) -> None:
        """Queue ``label`` (``[H, W]`` integers) as the pseudo label of ``image_id``."""
        self._raise_error()
        self._queue.put((image_id, label))

    def close(self) -> None:
        """Wait until every queued label is written; raises the thread's error, if any."""
        if self._thread.is_alive():
            self._queue.put(_CLOSE)
            self._thread.join()
        self._raise_error()

    def __enter__(self) -> "BackgroundLabelWriter":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is None:
            self.close()
        else:  # the loop's own error goes on; the labels queued before it are still written
            try:
                self.close()
            except BaseException:
                pass
