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

__all__ = ["MicroBatcher"]

_STOP = object()


class MicroBatcher:
    """Runs ``predict(items) -> results`` (same length, same order) on batches of submitted items."""

    def __init__(
        self, predict: Callable[[list[Any]], list[Any]], max_batch: int = 32, max_wait_ms: float = 5.0
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be ≥ 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be ≥ 0, got {max_wait_ms}")
        self.predict, self.max_batch, self.max_wait = predict, int(max_batch), max_wait_ms / 1000
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
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
        self.start()
        fut: Future = Future()
        self._queue.put((item, fut))
        return fut

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
