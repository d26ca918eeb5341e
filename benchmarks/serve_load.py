"""The prediction server under load on 127.0.0.1: N concurrent clients, with and without micro-batching.

Each client sends one real Fashion-MNIST test image per request (keep-alive connection) until it has
sent ``--requests`` or ``--seconds`` have passed. The server runs in its own process
(``hiervision serve``), once with micro-batching (``--max-batch``, ``--max-wait-ms``) and once with
``--max-batch 1`` (every image its own forward pass). Reported: p50/p99 latency, images/s, requests
sent vs answered 200 (none may be lost or failed), mean batch size the server ran.

``--faults``: the same good clients, first alone, then while other clients misbehave: bodies that
stall (announce 100000 bytes, send 100) or trickle, clients that vanish mid-upload, and bursts of
many-image requests past the server's queue (``--max-queue``), slow-loris connections that send half a
request line and stop (``--slow-headers`` of them opened in all, 1,600 at a time), and clients uploading
31 MB each (``--big-uploads`` at once). Good clients retry a 503 after its Retry-After (and a connection
closed before any answer), as well-behaved clients do; a good request is lost when it never gets its answer.
Reported: good requests lost, good p50/p99 without and with faults, how the faults were answered
(408 and the seconds until the connection closed, 503s, connections closed), the server's resident memory
before the faults and at its peak (``VmHWM``), and the tracebacks and lines in the server's log.

    python benchmarks/serve_load.py runs/x --clients 32 --requests 200 --out benchmarks/results/serve.json
    python benchmarks/serve_load.py --faults --out benchmarks/results/serve_faults.json
    python benchmarks/serve_load.py --tiny                                  # trains a tiny run, seconds

Without RUN a small run is trained on real Fashion-MNIST (synthetic images when it is not installed).
Without ``--out`` the results go to a temporary file (its name is printed), never over a tracked one.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_images(count: int) -> list[bytes]:
    """PNG bytes of real Fashion-MNIST test images (synthetic noise when the dataset is absent)."""
    try:
        from hiervision.data.fashion_mnist import default_root, read_idx

        arrays = read_idx(Path(default_root()) / "t10k-images-idx3-ubyte.gz")[:count]
    except (FileNotFoundError, ValueError, ImportError):
        arrays = np.random.default_rng(0).integers(0, 255, (count, 28, 28), dtype=np.uint8)
    out = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def train_tiny(out: Path, limit_train: int, epochs: int) -> Path:
    import yaml

    cfg = {"data": {"name": "fashion_mnist", "limit_train": limit_train, "limit_test": 100, "fallback": "synthetic"},
           "model": {"name": "flat", "backbone": "resnet20", "backbone_kwargs": {"width": 0.5}},
           "train": {"epochs": epochs, "batch_size": 64, "amp": "none", "progress": False}}
    (out / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    subprocess.run([sys.executable, "-m", "hiervision.cli", "train", str(out / "cfg.yaml"), "--out",
                    str(out / "run"), "--quiet"], check=True, stdout=subprocess.DEVNULL)
    return out / "run"


def start_server(run: str, port: int, max_batch: int, max_wait_ms: float, threads: int, log: Path,
                 extra: list[str] = ()) -> subprocess.Popen:
    """``hiervision serve`` in its own process; its stderr (the server's log) goes to ``log``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "hiervision.cli", "serve", run, "--port", str(port),
                                 "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), *extra],
                                env=env, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text(errors='replace')[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start within 120 s")


def multipart(images: bytes | list[bytes], boundary: str) -> bytes:
    """One request body with the ``file`` field once per image."""
    parts = [(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
              "Content-Type: image/png\r\n\r\n").encode() + im + b"\r\n"
             for im in ([images] if isinstance(images, bytes) else images)]
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def client(port: int, bodies: list[bytes], boundary: str, requests: int, deadline: float, out: dict) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    for i in range(requests):
        if time.monotonic() > deadline:
            break
        out["sent"] += 1
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/predict", body=bodies[i % len(bodies)], headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            ok = resp.status == 200 and len(json.loads(payload)["results"]) == 1
        except (OSError, http.client.HTTPException, ValueError, KeyError):
            ok = False
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        if ok:
            out["latency"].append(time.perf_counter() - t0)
        else:
            out["failed"] += 1
    conn.close()


def load(port: int, images: list[bytes], clients: int, requests: int, seconds: float) -> dict:
    boundary = uuid.uuid4().hex
    bodies = [multipart(im, boundary) for im in images]
    client(port, bodies, boundary, 3, time.monotonic() + 30, {"sent": 0, "failed": 0, "latency": []})  # warm-up
    batches0 = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/health"))["batches_run"]
    per = [{"sent": 0, "failed": 0, "latency": []} for _ in range(clients)]
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=client, args=(port, bodies[c::clients] or bodies, boundary, requests,
                                                     deadline, per[c])) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    batches = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/health"))["batches_run"] - batches0
    lat = sorted(x for p in per for x in p["latency"])
    ok = len(lat)
    return {"clients": clients, "sent": sum(p["sent"] for p in per), "ok": ok,
            "failed": sum(p["failed"] for p in per), "seconds": round(wall, 3),
            "images_per_s": round(ok / wall, 2) if wall else 0.0,
            "p50_ms": round(1000 * statistics.median(lat), 2) if lat else None,
            "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2) if lat else None,
            "mean_batch": round(ok / batches, 2) if batches else None}


# ----------------------------------------------------------------------------- faults
def post_with_retries(port: int, body: bytes, boundary: str, deadline: float) -> tuple[bool, int]:
    """A well-behaved client's request: retried after Retry-After on 503 until ``deadline``.
    ``(answered 200, 503s seen)``."""
    busy = 0
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            conn.request("POST", "/predict", body=body,
                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
            resp = conn.getresponse()
            payload = resp.read()
            if resp.status != 503:
                return resp.status == 200 and len(json.loads(payload)["results"]) == 1, busy
            busy += 1
            wait = float(resp.getheader("Retry-After") or 1)
        except (ConnectionResetError, BrokenPipeError):  # closed before an answer (a server shedding
            busy, wait = busy + 1, 0.1  # connections): nothing was answered, so sending again is safe
        except (OSError, http.client.HTTPException, ValueError, KeyError):
            return False, busy
        finally:
            conn.close()
        if time.monotonic() + wait > deadline:
            return False, busy
        time.sleep(wait)


def good_clients(port: int, bodies: list[bytes], boundary: str, clients: int, seconds: float) -> dict:
    stop = time.monotonic() + seconds
    per = [{"sent": 0, "ok": 0, "busy": 0, "latency": []} for _ in range(clients)]

    def run(out: dict, c: int) -> None:
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            ok, busy = post_with_retries(port, bodies[(out["sent"] + c) % len(bodies)], boundary, stop + 30)
            out["sent"] += 1
            out["ok"] += ok
            out["busy"] += busy
            if ok:
                out["latency"].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=run, args=(per[c], c)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat = sorted(x for p in per for x in p["latency"])
    sent, ok = sum(p["sent"] for p in per), sum(p["ok"] for p in per)
    return {"sent": sent, "ok": ok, "lost": sent - ok, "503_retried": sum(p["busy"] for p in per),
            "p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
            "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1) if lat else None}


def _raw_request(port: int, length: int, boundary: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall((f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
               f"boundary={boundary}\r\nContent-Length: {length}\r\n\r\n").encode())
    return s


def stalled_client(port: int, boundary: str, stop: float, out: dict) -> None:
    """Announces 100000 bytes, sends 100, stalls: how is it answered, and when is it disconnected?"""
    while time.monotonic() < stop:
        t0 = time.monotonic()
        with _raw_request(port, 100_000, boundary) as s:
            s.sendall(b"x" * 100)
            reply = b""
            try:
                while chunk := s.recv(65536):
                    reply += chunk
            except OSError:
                pass
        out["stalled"] += 1
        out["answered_408"] += reply.startswith(b"HTTP/1.1 408")
        out["max_seconds_to_close"] = max(out["max_seconds_to_close"], round(time.monotonic() - t0, 2))


def trickle_client(port: int, boundary: str, stop: float, out: dict) -> None:
    """Sends 10 bytes every 0.5 s (never a long pause, far below the minimum rate)."""
    while time.monotonic() < stop:
        t0 = time.monotonic()
        with _raw_request(port, 100_000, boundary) as s:
            s.settimeout(0.5)
            reply = b""
            while not reply and time.monotonic() - t0 < 60:
                try:
                    s.sendall(b"x" * 10)
                    reply = s.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break
        out["trickled"] += 1
        out["answered_408"] += reply.startswith(b"HTTP/1.1 408")
        out["max_seconds_to_close"] = max(out["max_seconds_to_close"], round(time.monotonic() - t0, 2))


def vanishing_client(port: int, boundary: str, stop: float, out: dict) -> None:
    """Sends half an upload and closes the connection."""
    while time.monotonic() < stop:
        with _raw_request(port, 20_000, boundary) as s:
            s.sendall(b"x" * 10_000)
        out["vanished"] += 1
        time.sleep(0.2)


def repeat_client(port: int, body: bytes, boundary: str, stop: float, out: dict, tag: str = "burst",
                  timeout: float = 60) -> None:
    """``body`` posted back to back, never retrying (many-image bursts past the queue, 31 MB uploads); the
    statuses counted as ``{tag}_{status}`` (0: the connection failed)."""
    while time.monotonic() < stop:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request("POST", "/predict", body=body,
                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
            status = conn.getresponse().status
        except (OSError, http.client.HTTPException):
            status = 0
        finally:
            conn.close()
        out[f"{tag}_{status}"] = out.get(f"{tag}_{status}", 0) + 1


def slow_header_client(port: int, stop: float, out: dict, hold: int, total: int) -> None:
    """Keeps up to ``hold`` connections open, each having sent half a request line and nothing more (a slow
    loris), opening new ones as the server closes them, until ``total`` have been opened in all (by every such
    client together: the count is shared)."""
    socks: list[socket.socket] = []
    while time.monotonic() < stop and out["slow_header_opened"] < total:
        while len(socks) < hold and out["slow_header_opened"] < total:
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.sendall(b"POST /pred")
                s.setblocking(False)
            except OSError:
                out["slow_header_refused"] += 1
                break
            socks.append(s)
            out["slow_header_opened"] += 1
        time.sleep(0.05)
        alive = []
        for s in socks:
            try:
                closed = s.recv(1) == b""
            except BlockingIOError:
                closed = False
            except OSError:
                closed = True
            if closed:
                s.close()
                out["slow_header_closed_by_server"] += 1
            else:
                alive.append(s)
        socks = alive
    for s in socks:
        s.close()


def rss_mb(pid: int, key: str) -> float | None:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of a process, in MB (Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def faults(port: int, images: list[bytes], clients: int, seconds: float, burst_files: int, log: Path,
           pid: int, slow_headers: int = 20_000, big_uploads: int = 30) -> dict:
    boundary = uuid.uuid4().hex
    bodies = [multipart(im, boundary) for im in images]
    good_clients(port, bodies, boundary, 1, 2)  # warm-up
    calm = good_clients(port, bodies, boundary, clients, seconds)
    burst_body = multipart([images[i % len(images)] for i in range(burst_files)], boundary)
    out = {"stalled": 0, "trickled": 0, "vanished": 0, "answered_408": 0, "max_seconds_to_close": 0.0,
           "slow_header_opened": 0, "slow_header_refused": 0, "slow_header_closed_by_server": 0}
    big_body = multipart(os.urandom(31 * 1024 * 1024), boundary)  # 31 MB that is no image: read, then refused
    rss_before = rss_mb(pid, "VmRSS")
    stop = time.monotonic() + seconds
    bad = ([threading.Thread(target=stalled_client, args=(port, boundary, stop, out)) for _ in range(4)]
           + [threading.Thread(target=trickle_client, args=(port, boundary, stop, out)) for _ in range(2)]
           + [threading.Thread(target=vanishing_client, args=(port, boundary, stop, out)) for _ in range(2)]
           + [threading.Thread(target=repeat_client, args=(port, burst_body, boundary, stop, out)) for _ in range(6)]
           + [threading.Thread(target=slow_header_client, args=(port, stop, out, 400, slow_headers))
              for _ in range(4 if slow_headers else 0)]
           + [threading.Thread(target=repeat_client, args=(port, big_body, boundary, stop, out, "big", 120))
              for _ in range(big_uploads)])
    for t in bad:
        t.start()
    under = good_clients(port, bodies, boundary, clients, seconds)
    for t in bad:
        t.join()
    text = log.read_text(errors="replace")
    return {"good_alone": calm, "good_under_faults": under, "faults": out,
            "server_rss_mb": {"before_faults": rss_before, "peak": rss_mb(pid, "VmHWM")},
            "server_log": {"tracebacks": text.count("Traceback"), "lines": text.count("\n"),
                           "went_away_lines": text.count("went away mid-upload"),
                           "too_slow_lines": text.count("request body too slow")}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", help="run folder or .onnx (default: train a small one)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=200, help="requests per client at most")
    p.add_argument("--seconds", type=float, default=60.0, help="time limit per configuration")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=2, help="OMP threads of the server process")
    p.add_argument("--tiny", action="store_true", help="a few clients and requests, a tiny run: seconds")
    p.add_argument("--faults", action="store_true", help="good clients alone, then beside misbehaving ones")
    p.add_argument("--max-queue", type=int, default=64, help="--faults: the server's --max-queue")
    p.add_argument("--burst-files", type=int, default=16, help="--faults: images per burst request")
    p.add_argument("--slow-headers", type=int, default=20_000,
                   help="--faults: connections opened in all that send half a request line and stop")
    p.add_argument("--big-uploads", type=int, default=30, help="--faults: clients uploading 31 MB at once")
    p.add_argument("--out", default=None, help="results JSON (default: a temporary file)")
    args = p.parse_args(argv)
    if args.tiny:
        args.clients, args.requests, args.seconds = min(args.clients, 4), min(args.requests, 6), min(args.seconds, 30)
    out = Path(args.out) if args.out else Path(tempfile.mkstemp(prefix="serve-", suffix=".json")[1])
    command = "python benchmarks/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="hv-serve-load-") as tmp:
        run = args.run or str(train_tiny(Path(tmp), 300 if args.tiny else 5000, 1 if args.tiny else 2))
        images = test_images(64)
        if args.faults:
            return _faults_main(args, run, images, Path(tmp), out, command)
        rows = {}
        for label, max_batch, wait in [("micro-batching", args.max_batch, args.max_wait_ms), ("no batching", 1, 0.0)]:
            port = free_port()
            server = start_server(run, port, max_batch, wait, args.threads, Path(tmp) / "server.log")
            try:
                rows[label] = {"max_batch": max_batch, "max_wait_ms": wait,
                               **load(port, images, args.clients, args.requests, args.seconds)}
            finally:
                server.terminate()
                server.wait(30)
    result = {"command": command, "run": args.run or "tiny run trained by this script", "tiny": args.tiny,
              "threads": args.threads, "cpu_count": os.cpu_count(), "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.clients} clients, ≤ {args.requests} requests each, ≤ {args.seconds:g} s, server OMP threads "
          f"{args.threads}\n| server | sent | ok | failed | images/s | p50 ms | p99 ms | mean batch |\n"
          "|---|---|---|---|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} (max batch {r['max_batch']}, wait {r['max_wait_ms']:g} ms) | {r['sent']} | {r['ok']} | "
              f"{r['failed']} | {r['images_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['mean_batch']} |")
    print(f"results: {out}")
    lost = sum(r["sent"] - r["ok"] for r in rows.values())
    if lost:
        print(f"{lost} requests lost or failed", file=sys.stderr)
    return 1 if lost else 0


def _faults_main(args, run: str, images: list[bytes], tmp: Path, out: Path, command: str) -> int:
    port, log = free_port(), tmp / "server.log"
    settings = ["--max-queue", str(args.max_queue), "--read-timeout", "2", "--min-body-rate", "4096"]
    server = start_server(run, port, args.max_batch, args.max_wait_ms, args.threads, log, settings)
    try:
        r = faults(port, images, args.clients, args.seconds, args.burst_files, log, server.pid, args.slow_headers,
                   args.big_uploads)
    finally:
        server.terminate()
        server.wait(30)
    r = {"command": command, "run": args.run or "tiny run trained by this script", "clients": args.clients,
         "seconds_per_phase": args.seconds, "server": " ".join(settings), "cpu_count": os.cpu_count(), **r}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2) + "\n")
    a, u, f = r["good_alone"], r["good_under_faults"], r["faults"]
    print(f"| good clients | sent | answered | lost | 503s retried | p50 ms | p99 ms |\n|---|---|---|---|---|---|---|\n"
          f"| alone | {a['sent']} | {a['ok']} | {a['lost']} | {a['503_retried']} | {a['p50_ms']} | {a['p99_ms']} |\n"
          f"| under faults | {u['sent']} | {u['ok']} | {u['lost']} | {u['503_retried']} | {u['p50_ms']} | "
          f"{u['p99_ms']} |")
    print(f"faults: {json.dumps(f)}; server log: {json.dumps(r['server_log'])}; server RSS MB: "
          f"{json.dumps(r['server_rss_mb'])}\nresults: {out}")
    return 1 if a["lost"] or u["lost"] or r["server_log"]["tracebacks"] else 0


if __name__ == "__main__":
    sys.exit(main())
