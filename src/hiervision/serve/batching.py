"""Micro-batching: concurrent requests share one forward pass.

One worker thread owns the model. It waits for a first image, then gathers more for at most
``max_wait_ms`` (or until ``max_batch``), predicts them together and hands each caller its own
record. Requests never touch the model directly, so the model is never run from two threads.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

__all__ = ["MicroBatcher", "QueueFull"]

_STOP = object()


class QueueFull(RuntimeError):
    """More images waiting than ``max_queue``: the server answers 503 instead of queueing without bound."""


class MicroBatcher:
    """Runs ``predict(items) -> results`` (same length, same order) on batches of submitted items;
    at most ``max_queue`` items wait or run at once (``None``: no bound)."""

    def __init__(
        self, predict: Callable[[list[Any]], list[Any]], max_batch: int = 32, max_wait_ms: float = 5.0,
        max_queue: int | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be ≥ 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be ≥ 0, got {max_wait_ms}")
        if max_queue is not None and max_queue < 1:
            raise ValueError(f"max_queue must be ≥ 1, got {max_queue}")
        self.predict, self.max_batch, self.max_wait = predict, int(max_batch), max_wait_ms / 1000
        self.max_queue = max_queue
        self.pending = 0  # items submitted and not yet answered
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._count = threading.Lock()  # guards `pending` (never held while waiting for the worker)
        #: sizes of the batches run so far (tests and the load benchmark read it)
        self.batch_sizes: list[int] = []

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="hiervision-batcher", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        """Finish what is queued, then end the worker."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                self._queue.put(_STOP)
                self._thread.join()
            self._thread = None

    def submit(self, item: Any) -> Future:
        """Queue one item; the future gets its result (or the batch's exception)."""
        return self.submit_many([item])[0]

    def submit_many(self, items: list[Any]) -> list[Future]:
        """Queue all of ``items`` or none: :class:`QueueFull` when they would take more than ``max_queue``."""
        self.start()
        with self._count:
            self.check_room(len(items))
            self.pending += len(items)
        futures = []
        for item in items:
            fut: Future = Future()
            fut.add_done_callback(self._done)
            self._queue.put((item, fut))
            futures.append(fut)
        return futures

    def check_room(self, n: int) -> None:
        """:class:`QueueFull` unless ``n`` more items fit under ``max_queue`` now."""
        if self.max_queue is not None and self.pending + n > self.max_queue:
            raise QueueFull(f"{self.pending} images waiting for the model, {n} more would pass the limit of "
                            f"{self.max_queue}; retry later")

    def _done(self, _: Future) -> None:
        with self._count:
            self.pending -= 1

    def _gather(self, first: tuple) -> tuple[list[tuple], bool]:
        batch, stop = [first], False
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            try:  # take what is already waiting, then wait out the deadline for more
                nxt = self._queue.get_nowait()
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    nxt = self._queue.get(timeout=left)
                except queue.Empty:
                    break
            if nxt is _STOP:
                stop = True
                break
            batch.append(nxt)
        return batch, stop

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stop = self._gather(first)
            live = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
            if live:
                self.batch_sizes.append(len(live))
                try:
                    results = self.predict([item for item, _ in live])
                    if len(results) != len(live):
                        raise RuntimeError(f"predictor returned {len(results)} results for {len(live)} images")
                    for (_, fut), res in zip(live, results):
                        fut.set_result(res)
                except Exception as e:  # one failing batch must not end the worker
                    for _, fut in live:
                        fut.set_exception(e)
            if stop:
                return
