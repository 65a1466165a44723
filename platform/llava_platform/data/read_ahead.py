"""Read a dataset epoch after epoch in a background thread, so the next epoch's first rows are ready in time.

Ray Data starts a new execution for every epoch: listing and reading the files again takes seconds
before the first rows arrive (about 20 s per epoch boundary on the 2-core demo machine, measured),
and the training workers would wait that out at every boundary. ``EpochReader`` keeps a few items
queued, across the boundary. Nothing here knows Ray: an epoch is whatever ``read_epoch(epoch)``
iterates.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

_END_OF_EPOCH = object()
_END = object()


class EpochReader:
    """Items of epochs ``first_epoch .. epochs - 1``, read ahead by at most ``depth`` items.

    ``items(epoch)`` yields one epoch's items in order; what an earlier epoch left unread is
    skipped. An error in the reader thread is raised in the consumer. Call ``close()`` when done
    (also when stopping early), or use the reader as a context manager.
    """

    def __init__(self, read_epoch: Callable[[int], Iterable[Any]], *, first_epoch: int, epochs: int, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(read_epoch, first_epoch, epochs), daemon=True,
                                        name="epoch-reader")
        self._thread.start()

    def items(self, epoch: int) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is _END:
                self._queue.put(_END)  # later epochs (there are none) end at once too
                return
            item_epoch, value = item
            if item_epoch < epoch:
                continue  # the rest of an epoch the consumer left early
            if value is _END_OF_EPOCH:
                return
            yield value

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)  # unblock a pending put
            except queue.Empty:
                pass
            self._thread.join(timeout=0.1)

    def __enter__(self) -> EpochReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _read(self, read_epoch: Callable[[int], Iterable[Any]], first_epoch: int, epochs: int) -> None:
        try:
            for epoch in range(first_epoch, epochs):
                for value in read_epoch(epoch):
                    if not self._put((epoch, value)):
                        return
                if not self._put((epoch, _END_OF_EPOCH)):
                    return
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(error)
            return
        self._put(_END)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False
