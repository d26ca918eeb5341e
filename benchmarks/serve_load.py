"""The prediction server under load on 127.0.0.1: N concurrent clients, with and without micro-batching.

Each client sends one real Fashion-MNIST test image per request (keep-alive connection) until it has
sent ``--requests`` or ``--seconds`` have passed. The server runs in its own process
(``hiervision serve``), once with micro-batching (``--max-batch``, ``--max-wait-ms``) and once with
``--max-batch 1`` (every image its own forward pass). Reported: p50/p99 latency, images/s, requests
sent vs answered 200 (none may be lost or failed), mean batch size the server ran.

    python benchmarks/serve_load.py runs/x --clients 32 --requests 200      # writes benchmarks/results/serve.json
    python benchmarks/serve_load.py --tiny --out /tmp/serve.json            # trains a tiny run, seconds

Without RUN a small run is trained on real Fashion-MNIST (synthetic images when it is not installed).
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


def start_server(run: str, port: int, max_batch: int, max_wait_ms: float, threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "hiervision.cli", "serve", run, "--port", str(port),
                             "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start within 120 s")


def multipart(image: bytes, boundary: str) -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()


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
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve.json"))
    args = p.parse_args(argv)
    if args.tiny:
        args.clients, args.requests, args.seconds = min(args.clients, 4), min(args.requests, 6), min(args.seconds, 30)
    with tempfile.TemporaryDirectory(prefix="hv-serve-load-") as tmp:
        run = args.run or str(train_tiny(Path(tmp), 300 if args.tiny else 5000, 1 if args.tiny else 2))
        images = test_images(64)
        rows = {}
        for label, max_batch, wait in [("micro-batching", args.max_batch, args.max_wait_ms), ("no batching", 1, 0.0)]:
            port = free_port()
            server = start_server(run, port, max_batch, wait, args.threads)
            try:
                rows[label] = {"max_batch": max_batch, "max_wait_ms": wait,
                               **load(port, images, args.clients, args.requests, args.seconds)}
            finally:
                server.terminate()
                server.wait(30)
    result = {"run": args.run or "tiny run trained by this script", "tiny": args.tiny, "threads": args.threads,
              "cpu_count": os.cpu_count(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.clients} clients, ≤ {args.requests} requests each, ≤ {args.seconds:g} s, server OMP threads "
          f"{args.threads}\n| server | sent | ok | failed | images/s | p50 ms | p99 ms | mean batch |\n"
          "|---|---|---|---|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} (max batch {r['max_batch']}, wait {r['max_wait_ms']:g} ms) | {r['sent']} | {r['ok']} | "
              f"{r['failed']} | {r['images_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['mean_batch']} |")
    lost = sum(r["sent"] - r["ok"] for r in rows.values())
    if lost:
        print(f"{lost} requests lost or failed", file=sys.stderr)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
