"""Connections a client cannot hoard: uvicorn's HTTP protocol with a deadline for a request's headers and a cap on
open connections.

A slow-loris client opens connections and sends headers a byte at a time; uvicorn waits for them forever, and
each one holds a file descriptor until the table is full and nobody is answered. Here every connection must
deliver its request's headers within ``header_timeout_s`` (again for each request on a kept-alive connection),
else it is closed. Past ``max_connections`` open connections, the oldest one still sending headers is closed to
make room (so newcomers, who send theirs at once, are served while hoarders are evicted); when every connection
is busy with a real request, the newcomer is closed instead. Each kind of refusal is one log line per
``LOG_EVERY_S`` seconds with its count, never one per client, never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["LOG_EVERY_S", "guarded_protocol"]

log = logging.getLogger("hiervision.serve")
#: refusals of one kind are summed into one log line per this many seconds
LOG_EVERY_S = 10.0


class _Tally:
    """Counts of refused connections, logged as one line per kind every :data:`LOG_EVERY_S` seconds."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.last: dict[str, float] = {}

    def add(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1
        now = time.monotonic()
        if now - self.last.get(what, -LOG_EVERY_S) >= LOG_EVERY_S:
            log.warning("%d connection(s) %s since the last report", self.counts[what], what)
            self.counts[what], self.last[what] = 0, now


def guarded_protocol(max_connections: int, header_timeout_s: float) -> type[H11Protocol]:
    """A uvicorn ``http`` protocol class (``uvicorn.Config(http=...)``) with these limits; one per server, since
    its connections waiting for headers are shared by the class."""
    waiting: OrderedDict[GuardedH11, None] = OrderedDict()  # connections still sending headers, oldest first
    tally = _Tally()

    class GuardedH11(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                if waiting:  # evict the oldest hoarder: newcomers send their headers at once
                    oldest = next(iter(waiting))
                    oldest._close("evicted while sending headers (over --max-connections)")
                else:  # every connection is in a real request: this one waits its turn elsewhere
                    self._close("refused (over --max-connections, all busy)")
                    return
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._deadline is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()  # the next request on a kept-alive connection: its headers have a deadline too
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # headers complete: the body has its own limits (408, 413)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(header_timeout_s, self._close,
                                                  "closed: headers not complete within --header-timeout")
            waiting[self] = None

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            waiting.pop(self, None)

        def _close(self, what: str) -> None:
            self._disarm()
            tally.add(what)
            if not self.transport.is_closing():
                self.transport.abort()  # frees the descriptor now, sends nothing a hoarder could wait on

    return GuardedH11
