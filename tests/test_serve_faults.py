"""The server under client faults, on a real uvicorn server on 127.0.0.1: a body that stalls or trickles is
answered 408 within a bounded time, a client that vanishes mid-upload is one log line, a burst past the
queue gets 503 + Retry-After, and well-behaved clients keep getting answers through all of it.

The model is a stub (a fixed record after a short sleep), so the test measures the server, not a network.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from conftest import serving  # noqa: E402
from hiervision.records import TreeView, prediction_record  # noqa: E402
from hiervision.serve import Limits, create_app  # noqa: E402
from test_serve import png  # noqa: E402

BOUNDARY = "hvfaults"
LIMITS = Limits(max_files=8, max_body_bytes=200_000, read_timeout_s=0.5, min_body_rate=2000, max_queue=8)


class StubPredictor:
    """Two classes under the root; every batch takes ``delay`` seconds."""

    tree = TreeView(("root", "a", "b"), (-1, 0, 0))
    in_chans, image_size = 3, (16, 16)

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def predict_arrays(self, images: list[np.ndarray]) -> list[dict]:
        time.sleep(self.delay)
        return [prediction_record("", self.tree, [1], 0.75, [1.0, 0.75, 0.25], [([1], 0.75)]) for _ in images]


@pytest.fixture(scope="module")
def server():
    app = create_app(StubPredictor(0.05), max_batch=4, max_wait_ms=2, limits=LIMITS)
    # log_config=None: uvicorn's records reach the root logger, where caplog sees every line it would print
    with serving(app, log_config=None, log_level="info") as port:
        yield port, app


def body(files: int = 1) -> bytes:
    parts = [(f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{i}.png\"\r\n"
              "Content-Type: image/png\r\n\r\n").encode() + png(i) + b"\r\n" for i in range(files)]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def head(length: int) -> bytes:
    return (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}"
            f"\r\nContent-Length: {length}\r\n\r\n").encode()


def read_all(sock: socket.socket, limit: float) -> bytes:
    """Everything the server sends until it closes the connection (or ``limit`` seconds pass)."""
    sock.settimeout(limit)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except TimeoutError:
        pass
    return out


def post(port: int, files: int = 1) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/predict", body=body(files),
                     headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
        resp = conn.getresponse()
        return resp.status, {"retry_after": resp.getheader("Retry-After"), **json.loads(resp.read())}
    finally:
        conn.close()


def good_client(port: int, requests: int) -> tuple[int, int]:
    """A well-behaved client: one image per request, retrying on 503 after Retry-After. ``(sent, answered)``."""
    answered = 0
    for _ in range(requests):
        for _ in range(50):
            status, reply = post(port)
            if status != 503:
                break
            time.sleep(float(reply["retry_after"]) / 10)  # shortened for the test
        answered += status == 200 and reply["results"][0]["path"] == ["a"]
    return requests, answered


def test_a_stalled_body_gets_408_and_the_connection_closed(server):
    port, _ = server
    with socket.create_connection(("127.0.0.1", port)) as s:
        t0 = time.monotonic()
        s.sendall(head(100_000) + b"x" * 100)  # announces 100000 bytes, sends 100, stalls
        reply = read_all(s, 10)
        waited = time.monotonic() - t0
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"request body too slow: 100 of 100000 bytes" in reply
    assert waited < 3, f"answered after {waited:.1f} s (read timeout 0.5 s)"  # and closed: read_all returned


def test_a_trickling_body_gets_408_in_bounded_time(server):
    port, _ = server
    with socket.create_connection(("127.0.0.1", port)) as s:
        t0 = time.monotonic()
        s.sendall(head(100_000))
        s.settimeout(0.2)
        reply = b""
        while time.monotonic() - t0 < 10 and not reply:
            try:
                s.sendall(b"x" * 10)  # 10 bytes every 0.2 s: never a long pause, far below 2000 bytes/s
                reply = s.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
        waited = time.monotonic() - t0
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert waited < 3, f"answered after {waited:.1f} s"


def test_a_client_gone_mid_upload_is_one_log_line(server, caplog):
    port, _ = server
    caplog.set_level(logging.INFO)
    caplog.clear()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head(100_000) + b"x" * 100)
        time.sleep(0.1)
    end = time.monotonic() + 5
    while time.monotonic() < end and not any(r.levelno >= logging.WARNING for r in caplog.records):
        time.sleep(0.05)  # until the server notices the closed socket
    time.sleep(0.2)  # and anything it would log after that line
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "went away mid-upload (100 bytes received)" in lines[0], lines
    assert not any(r.exc_info for r in caplog.records), "a traceback was logged"
    assert post(port)[0] == 200


def test_bursts_past_the_queue_get_503_while_good_clients_lose_nothing(server):
    port, app = server
    with ThreadPoolExecutor(40) as pool:
        good = [pool.submit(good_client, port, 10) for _ in range(4)]
        burst = [pool.submit(post, port, 4) for _ in range(24)]  # 4 images each into a queue of 8
        slow = [pool.submit(test_a_stalled_body_gets_408_and_the_connection_closed, server) for _ in range(3)]
        replies = [f.result() for f in burst]
        statuses = [status for status, _ in replies]
        for f in slow:
            f.result()
        sent_answered = [f.result() for f in good]
    assert 503 in statuses and 200 in statuses, statuses
    assert set(statuses) <= {200, 503}
    busy = next(reply for status, reply in replies if status == 503)
    assert busy["retry_after"] == "1" and "server busy:" in busy["detail"] and "limit of 8" in busy["detail"]
    assert sum(s for s, _ in sent_answered) == sum(a for _, a in sent_answered) == 40  # 0 good requests lost
    assert app.state.batcher.pending == 0
    assert post(port, 8)[0] == 200  # the queue drained: a request as large as the queue fits again


def _guarded_server(**limits):
    from hiervision.serve.connections import guarded_protocol

    lim = Limits(**{**LIMITS.model_dump(), **limits})
    app = create_app(StubPredictor(0.01), max_batch=4, max_wait_ms=2, limits=lim)
    return serving(app, log_config=None, log_level="info",
                   http=guarded_protocol(lim.max_connections, lim.header_timeout_s))


def _closed_by_server(sock: socket.socket) -> bool:
    """The server closed (or reset) the connection without sending anything."""
    try:
        return read_all(sock, 0.2) == b""
    except ConnectionResetError:
        return True


def test_slow_header_connections_are_closed_and_cannot_crowd_out_good_clients(caplog):
    with _guarded_server(max_connections=20, header_timeout_s=0.5) as port:
        hoarders = []
        for _ in range(60):  # three times the cap, each sending half a request line and then nothing
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /pred")
            hoarders.append(s)
        sent, answered = good_client(port, 5)  # evicts hoarders: newcomers send their headers at once
        assert answered == sent == 5
        time.sleep(0.8)
        closed = sum(_closed_by_server(s) for s in hoarders)
        for s in hoarders:
            s.close()
    assert closed == 60
    lines = [r.getMessage() for r in caplog.records if "connection(s)" in r.getMessage()]
    assert 1 <= len(lines) <= 4 and not any(r.exc_info for r in caplog.records)  # counted, not one per client


def test_uploads_in_flight_are_bounded_and_a_huge_id_is_a_4xx():
    with _guarded_server(max_inflight_bytes=250_000) as port:
        def slow_upload():
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(head(200_000) + b"x" * 1000)  # announces 200 kB, then waits: holds 200 kB of the budget
            return s

        holder = slow_upload()
        time.sleep(0.1)
        status, _ = post(port)  # a small request fits beside it (200 kB + a few kB ≤ 250 kB)
        over = slow_upload()
        reply_over = read_all(over, 1.0)
        holder.close()
        over.close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/taxonomy/nodes?ids=" + "9" * 5000)
        resp = conn.getresponse()
        assert resp.status == 404 and "does not exist" in json.loads(resp.read())["detail"]
    assert status == 200
    assert b" 503 " in reply_over.split(b"\r\n")[0] and b"bytes of uploads already in flight" in reply_over
