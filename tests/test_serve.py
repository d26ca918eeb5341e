"""The prediction server: answers equal the model's, micro-batching changes nothing, bad requests get
a clear 4xx and the server keeps answering."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
from fastapi.testclient import TestClient  # noqa: E402

from hiervision.cli import main  # noqa: E402
from hiervision.decisions import calibrate  # noqa: E402
from hiervision.experiment import load_run  # noqa: E402
from hiervision.serve import Limits, create_app, load_predictor  # noqa: E402
from hiervision.serve.batching import MicroBatcher  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    cfg = {"data": {"name": "synthetic", "n_train": 128, "n_test": 32, "size": 16},
           "model": {"name": "flat", "backbone": "resnet20", "backbone_kwargs": {"width": 0.5}},
           "train": {"epochs": 1, "batch_size": 64, "amp": "none"}}
    (d / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(d / "tiny.yaml"), "--out", str(d / "run"), "--quiet"]) == 0
    return d / "run"


@pytest.fixture(scope="module")
def predictor(run_dir):
    return load_predictor(run_dir, top_k=3)


@pytest.fixture(scope="module")
def client(predictor):
    app = create_app(predictor, max_batch=8, max_wait_ms=20,
                     limits=Limits(max_files=4, max_body_bytes=200_000, max_pixels=100_000))
    with TestClient(app) as c:
        yield c


def png(seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_predict_equals_the_model(client, run_dir):
    _, taxonomy, model, meta = load_run(run_dir)
    images = [png(i) for i in range(3)]
    r = client.post("/predict", files=[("file", (f"im{i}.png", b, "image/png")) for i, b in enumerate(images)])
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    x = torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(b)).convert("RGB"))).permute(2, 0, 1)
                     for b in images]).float() / 255
    mean, std = torch.tensor(meta["mean"]).view(1, -1, 1, 1), torch.tensor(meta["std"]).view(1, -1, 1, 1)
    # the server's probabilities are calibrated with the run's temperature, as evaluate's are
    pred = calibrate(model.predict((x - mean) / std), taxonomy, float(model.temperature))
    for i, res in enumerate(results):
        ids = [int(n) for n in pred.paths[i] if n >= 0]
        assert res["file"] == f"im{i}.png"
        assert res["path_ids"] == ids and res["path"] == [taxonomy.names[n] for n in ids]
        assert res["path_probability"] == pytest.approx(float(pred.path_prob[i]), abs=1e-5)
        assert res["node_probabilities"] == pytest.approx([float(pred.scores[i, n]) for n in ids], abs=1e-5)
        assert 1 <= len(res["top_k"]) <= 3 and res["top_k"][0]["path_ids"] == ids
        probs = [a["probability"] for a in res["top_k"]]
        assert probs == sorted(probs, reverse=True)
        assert "node_scores" not in res and "hedged" not in res


def test_node_scores_on_request(client, predictor):
    r = client.post("/predict?node_scores=true", files={"file": ("a.png", png(0), "image/png")})
    res = r.json()["results"][0]
    assert len(res["node_scores"]) == predictor.tree.num_nodes
    assert [res["node_scores"][n] for n in res["path_ids"]] == res["node_probabilities"]


def test_concurrent_requests_are_batched_and_equal_unbatched(client, predictor):
    images = [png(100 + i) for i in range(12)]
    alone = [client.post("/predict", files={"file": (f"{i}.png", b, "image/png")}).json()["results"][0]
             for i, b in enumerate(images)]
    batcher = client.app.state.batcher
    before = len(batcher.batch_sizes)
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda ib: client.post("/predict", files={"file": (f"{ib[0]}.png", ib[1],
                                                                                  "image/png")}).json(),
                                 enumerate(images)))
    sizes = batcher.batch_sizes[before:]
    assert sum(sizes) == 12 and max(sizes) > 1, sizes  # some requests shared a forward pass
    for a, t in zip(alone, together):
        t = t["results"][0]
        assert t["path_ids"] == a["path_ids"] and t["file"] == a["file"]
        assert t["path_probability"] == pytest.approx(a["path_probability"], abs=1e-5)


def test_taxonomy_health_openapi(client, predictor):
    tax = client.get("/taxonomy").json()
    assert [n["name"] for n in tax["nodes"]] == list(predictor.tree.names)
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["nodes"] == predictor.tree.num_nodes - 1
    assert health["classes"] == int(predictor.tree.leaf_mask.sum())  # end classes, not every node
    assert health["answers"] == {"within": None, "allowed_classes": None, "min_prob": None, "ranks": []}
    schema = client.get("/openapi.json").json()
    assert "/predict" in schema["paths"] and "/taxonomy" in schema["paths"]
    page = client.get("/")
    assert page.status_code == 200 and "<svg" in page.text
    js = client.get("/static/app.js")
    assert js.status_code == 200 and js.headers["cache-control"] == "no-cache"


def flat_png(size: int) -> bytes:
    """A one-colour PNG: many pixels in few bytes."""
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (90, 120, 200)).save(buf, "PNG")
    return buf.getvalue()


def truncated_png() -> bytes:
    return png(1, 64)[:200]


def bomb_png() -> bytes:
    """A valid PNG header that claims 20000×20000 pixels: a few hundred bytes, 400 M pixels decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big"))
    ihdr = (20000).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 1000))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


BAD_REQUESTS = [  # (what, request kwargs, status, words in the message)
    ("not an image", {"files": {"file": ("notes.txt", b"hello, not pixels", "text/plain")}}, 400, "not an image"),
    ("truncated image", {"files": {"file": ("cut.png", truncated_png(), "image/png")}}, 400, "unreadable"),
    ("empty file", {"files": {"file": ("empty.png", b"", "image/png")}}, 400, "empty"),
    ("too many pixels", {"files": {"file": ("big.png", flat_png(400), "image/png")}}, 413, "400x400 = 160000 pixels"),
    ("decompression bomb", {"files": {"file": ("bomb.png", bomb_png(), "image/png")}}, 413, "too many pixels"),
    ("body too large", {"files": {"file": ("big.png", b"\0" * 300_000, "image/png")}}, 413, "larger than"),
    ("too many files", {"files": [("file", (f"{i}.png", png(i), "image/png")) for i in range(5)]}, 413, "files"),
    ("json body", {"json": {"file": "x"}}, 415, "multipart/form-data"),
    ("no content type", {"content": b"raw bytes"}, 415, "multipart/form-data"),
    ("no file field", {"files": {"image": ("a.png", png(0), "image/png")}}, 422, "file"),
]


@pytest.mark.parametrize("what,kwargs,status,words", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_clear_4xx_and_server_keeps_working(client, what, kwargs, status, words):
    r = client.post("/predict", **kwargs)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and words in detail and "\n" not in detail
    ok = client.post("/predict", files={"file": ("a.png", png(0), "image/png")})
    assert ok.status_code == 200


def test_wrong_method_and_path(client):
    assert client.get("/predict").status_code == 405
    assert client.get("/nope").status_code == 404


def test_batcher_error_reaches_every_caller_and_worker_survives():
    calls = []

    def predict(items):
        calls.append(list(items))
        if "boom" in items:
            raise RuntimeError("bad batch")
        return [x * 2 for x in items]

    b = MicroBatcher(predict, max_batch=4, max_wait_ms=50)
    futs = [b.submit(x) for x in ["boom", 1]]
    with pytest.raises(RuntimeError, match="bad batch"):
        futs[0].result(5)
    assert b.submit(3).result(5) == 6
    b.stop()
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(predict, max_batch=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_uvicorn_server(predictor):
    uvicorn = pytest.importorskip("uvicorn")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(predictor), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        assert json.load(urllib.request.urlopen(base + "/health", timeout=10))["status"] == "ok"
        boundary = "hvboundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + png(0) + f"\r\n--{boundary}--\r\n".encode()
        req = urllib.request.Request(base + "/predict", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        res = json.load(urllib.request.urlopen(req, timeout=10))["results"][0]
        assert res["file"] == "a.png" and res["path"]
        bad = urllib.request.Request(base + "/predict", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(bad, timeout=10)
        assert e.value.code == 415
    finally:
        server.should_exit = True
        thread.join(10)


def test_cli_serve_user_errors(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 1
    assert "missing: neither a run folder nor an .onnx file" in capsys.readouterr().err
    for flag, value, words in (("--max-batch", "0", "must be ≥ 1, got 0"),
                               ("--port", "70000", "must be a port number 0–65535"),
                               ("--read-timeout", "nan", "must be a finite number > 0"),
                               ("--max-wait-ms", "-1", "must be a finite number ≥ 0")):
        with pytest.raises(SystemExit) as e:  # argparse: usage and one error line naming the flag, status 2
            main(["serve", str(tmp_path), flag, value])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"argument {flag}: {words}" in err, err
    assert main(["evaluate", str(tmp_path), "--device", "tpu"]) == 1
    assert "--device='tpu' is not a device (auto, cpu, cuda or cuda:N)" in capsys.readouterr().err


@pytest.mark.slow
def test_onnx_file_serves_the_same_answers(run_dir, client, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from hiervision.export import export_onnx

    export_onnx(run_dir, tmp_path / "model.onnx")
    onnx_pred = load_predictor(tmp_path / "model.onnx", top_k=3)
    files = [("file", (f"im{i}.png", png(200 + i), "image/png")) for i in range(4)]
    with TestClient(create_app(onnx_pred)) as onnx_client:
        from_onnx = onnx_client.post("/predict", files=files).json()["results"]
    from_run = client.post("/predict", files=files).json()["results"]
    for a, b in zip(from_onnx, from_run):
        assert a["path_ids"] == b["path_ids"] and a["file"] == b["file"]
        assert a["path_probability"] == pytest.approx(b["path_probability"], abs=1e-4)
        assert [t["path_ids"] for t in a["top_k"]] == [t["path_ids"] for t in b["top_k"]]


def test_hedged_answer_hook(run_dir, predictor):
    pytest.importorskip("hiervision.decisions")
    (run_dir / "decisions.json").write_text(json.dumps({"temperature": 1.0, "hedge": {"0.9": 0.0, "0.99": 1e9}}))
    try:
        with pytest.raises(ValueError, match="no hedging λ for accuracy 0.5"):
            load_predictor(run_dir).runtime.hedger(0.5)
        runtime = load_predictor(run_dir).runtime
        sure, root = runtime.hedger(0.9), runtime.hedger(0.99)
        with TestClient(create_app(predictor, hedge=sure)) as c:
            res = c.post("/predict", files={"file": ("a.png", png(0), "image/png")}).json()["results"][0]
        assert res["hedged"]["path"] == res["path"]  # λ = 0: the most probable leaf, no hedging
        with TestClient(create_app(predictor, hedge=root)) as c:
            res = c.post("/predict", files={"file": ("a.png", png(0), "image/png")}).json()["results"][0]
        assert res["hedged"]["path"] == [] and res["hedged"]["probability"] == pytest.approx(1.0)
    finally:
        (run_dir / "decisions.json").unlink()


def test_images_of_different_sizes_in_one_batch(predictor):
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 255, (h, h, 3), dtype=np.uint8) for h in (16, 20, 16)]
    together = predictor.predict_arrays(images)
    alone = [predictor.predict_arrays([im])[0] for im in images]
    assert [r["path_ids"] for r in together] == [r["path_ids"] for r in alone]
    assert [r["path_probability"] for r in together] == pytest.approx([r["path_probability"] for r in alone],
                                                                      abs=1e-5)


def test_chunked_body_over_the_limit_is_cut_off(client):
    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(30):
            yield b"\0" * 10_000

    r = client.post("/predict", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 413 and "larger than 200000 bytes" in r.json()["detail"]
    assert client.get("/health").json()["status"] == "ok"


def test_docs_are_served_from_local_files(client):
    pytest.importorskip("fastapi_offline")
    page = client.get("/docs")
    assert page.status_code == 200 and "/docs/assets/swagger-ui-bundle.js" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert client.get(f"/docs/assets/{asset}").status_code == 200


# ----------------------------------------------------------------------------- a big tree, a few nodes at a time
def test_taxonomy_nodes_are_the_trees_nodes_with_a_page_of_children(client, predictor):
    tree = predictor.tree
    inner = next(v for v in range(1, tree.num_nodes) if len(tree.children[v]) >= 3)
    leaf = next(v for v in range(1, tree.num_nodes) if not tree.children[v])
    r = client.get(f"/taxonomy/nodes?ids=0,{inner}&ids={leaf}")
    assert r.status_code == 200, r.text
    root, node, end = r.json()["nodes"]
    assert (root["id"], root["parent"], root["depth"], root["path_ids"], root["more"]) == (0, -1, 0, [], 0)
    assert [c["id"] for c in root["children"]] == list(tree.children[0]) and root["num_children"] == len(
        tree.children[0])
    assert node["path_ids"] == list(tree.path(inner)) and node["path"] == [tree.names[n] for n in tree.path(inner)]
    assert (node["name"], node["parent"], node["depth"]) == (tree.names[inner], tree.parents[inner],
                                                             len(tree.path(inner)))
    assert node["children"] == [{"id": c, "name": tree.names[c], "num_children": len(tree.children[c])}
                                for c in tree.children[inner]]
    assert end["children"] == [] and end["num_children"] == 0 and end["path_ids"][-1] == leaf
    # a page of the children and a count of the rest
    page = client.get(f"/taxonomy/nodes?ids={inner}&offset=1&limit=1").json()["nodes"][0]
    kids = tree.children[inner]
    assert [c["id"] for c in page["children"]] == [kids[1]] and page["more"] == len(kids) - 2
    assert page["num_children"] == len(kids)
    past = client.get(f"/taxonomy/nodes?ids={inner}&offset=99").json()["nodes"][0]
    assert past["children"] == [] and past["more"] == 0


BAD_IDS = [  # (query, status, words in the message)
    ("ids=abc", 422, "'abc' is not a node id"),
    ("ids=0,-1", 422, "'-1' is not a node id"),
    ("ids=3,99999", 404, "node 99999 does not exist"),
    ("ids=", 422, "at least one node id"),
    ("", 422, "ids: Field required"),
    ("ids=" + ",".join(["1"] * 257), 422, "257 ids, more than the limit of 256"),
    ("ids=0&limit=1001", 422, "limit:"),
    ("ids=0&offset=-1", 422, "offset:"),
]


@pytest.mark.parametrize("query,status,words", BAD_IDS, ids=[b[0][:20] for b in BAD_IDS])
def test_bad_node_ids_get_one_line_naming_the_id(client, query, status, words):
    r = client.get(f"/taxonomy/nodes?{query}")
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert words in detail and "\n" not in detail and "multipart" not in detail


def test_predict_siblings_are_the_most_probable_children_at_each_level(client, predictor):
    tree = predictor.tree
    r = client.post("/predict?siblings=2&node_scores=true", files={"file": ("a.png", png(0), "image/png")})
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    scores, path = res["node_scores"], res["path_ids"]
    levels = res["siblings"]
    assert [lv["parent"] for lv in levels] == ([0, *path] if tree.children[path[-1]] else [0, *path[:-1]])
    for d, lv in enumerate(levels):
        kids = tree.children[lv["parent"]]
        ids = [n["id"] for n in lv["nodes"]]
        assert lv["num_children"] == len(kids) and set(ids) <= set(kids) and len(ids) == min(2, len(kids))
        if d < len(path):
            assert path[d] in ids
        assert [n["probability"] for n in lv["nodes"]] == [scores[n] for n in ids]
        assert ids == sorted(ids, key=lambda n: -scores[n])
        assert all(n["name"] == tree.names[n["id"]] and n["num_children"] == len(tree.children[n["id"]])
                   for n in lv["nodes"])
    plain = client.post("/predict", files={"file": ("a.png", png(0), "image/png")}).json()["results"][0]
    assert "siblings" not in plain
    bad = client.post("/predict?siblings=101", files={"file": ("a.png", png(0), "image/png")})
    assert bad.status_code == 422 and "siblings" in bad.json()["detail"]


def test_path_siblings_keep_the_path_node_and_cost_no_more_than_the_fan_out():
    from hiervision.records import TreeView
    from hiervision.serve.nodes import path_siblings

    # root -> 1..5; 1 -> 6, 7, 8; the path 1 > 6 has low scores, its siblings high ones
    tree = TreeView(tuple(f"n{i}" for i in range(9)), (-1, 0, 0, 0, 0, 0, 1, 1, 1))
    scores = [1, .1, .3, .2, .25, .15, .01, .5, .4]
    levels = path_siblings(tree, [1, 6], scores, k=2)
    assert [[n["id"] for n in lv["nodes"]] for lv in levels] == [[2, 1], [7, 6]]  # not [2, 4], [7, 8]
    assert [lv["num_children"] for lv in levels] == [5, 3]
    # an answer that stops at an inner node: one more level lists its children
    levels = path_siblings(tree, [1], scores, k=5)
    assert [lv["parent"] for lv in levels] == [0, 1] and [n["id"] for n in levels[1]["nodes"]] == [7, 8, 6]
    assert [n["id"] for n in levels[0]["nodes"]] == [2, 4, 3, 5, 1]


# ----------------------------------------------------------------------------- per-request answers
def post_form(base: str, image: bytes, **fields: str) -> tuple[int, dict]:
    """``POST base/predict`` with one image and the form ``fields``: (status, JSON body)."""
    boundary = "hvanswers"
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
             for k, v in fields.items()]
    parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
                 "Content-Type: image/png\r\n\r\n".encode() + image + b"\r\n")
    req = urllib.request.Request(base + "/predict", data=b"".join(parts) + f"--{boundary}--\r\n".encode(),
                                 method="POST", headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


@pytest.fixture(scope="module")
def live(predictor):
    """The app (no defaults of its own) served by uvicorn on 127.0.0.1; a wait long enough for batches to mix."""
    pytest.importorskip("uvicorn")
    from conftest import serving

    app = create_app(predictor, max_batch=16, max_wait_ms=50)
    with serving(app) as port:
        yield SimpleNamespace(base=f"http://127.0.0.1:{port}", batch_sizes=app.state.batcher.batch_sizes)


def under(tree, node: int, ids: list[int]) -> bool:
    return all(node in tree.path(n) for n in ids)


def test_form_fields_restrict_and_roll_up_this_request_only(live, predictor):
    tree = predictor.tree
    horizontal = tree.names.index("horizontal")
    status, body = post_form(live.base, png(0), within="horizontal", min_prob="0.9", min_prob_at="1=0.5")
    assert status == 200, body
    rec = body["results"][0]
    # restricted: the answer and every alternative lie within the subtree, whose mass is the whole
    assert rec["allowed"] == {"description": "within horizontal", "classes": 6}
    assert under(tree, horizontal, rec["path_ids"]) and rec["node_probabilities"][0] == pytest.approx(1.0)
    assert all(under(tree, horizontal, a["path_ids"]) for a in rec["top_k"])
    # rolled up: a trace over the answer's path with this request's thresholds, and its sentence
    roll = rec["rollup"]
    assert [s["node"] for s in roll["trace"]] == rec["path"]
    assert [s["threshold"] for s in roll["trace"]] == [0.5, 0.9, 0.9]
    assert roll["path_ids"] == rec["path_ids"][: roll["depth"]] and roll["depth"] >= 1  # horizontal: p = 1
    met = [s["met"] for s in roll["trace"]]
    assert roll["stopped"] == (not all(met))
    assert roll["why"].startswith("stopped at " if roll["stopped"] else "reached ")
    # the next request without fields: the server's defaults (none), not the previous request's
    status, plain = post_form(live.base, png(0))
    assert status == 200 and "rollup" not in plain["results"][0] and "allowed" not in plain["results"][0]
    # a path works as well as a unique name; a level threshold alone is enough for a roll-up
    status, body = post_form(live.base, png(0), within="vertical/square", min_prob_at="3=1")
    rec = body["results"][0]
    assert status == 200 and rec["allowed"]["classes"] == 2 and rec["path"][:2] == ["vertical", "square"]
    assert rec["rollup"]["depth"] <= 3 and [s["threshold"] for s in rec["rollup"]["trace"]] == [0, 0, 1]


def test_requests_with_other_fields_are_never_answered_under_anothers(live):
    """Concurrent requests with and without fields share the batcher; each is answered under its own options."""
    before = len(live.batch_sizes)
    asks = [{}, {"within": "vertical"}, {"min_prob": "0.5"}, {"within": "horizontal", "min_prob": "0.2"}] * 3
    with ThreadPoolExecutor(len(asks)) as pool:
        got = list(pool.map(lambda ia: post_form(live.base, png(300 + ia[0] % 4), **ia[1]), enumerate(asks)))
    for ask, (status, body) in zip(asks, got):
        assert status == 200, body
        rec = body["results"][0]
        assert ("allowed" in rec) == ("within" in ask) and ("rollup" in rec) == ("min_prob" in ask)
        if "within" in ask:
            assert rec["path"][0] == ask["within"]
        if "min_prob" in ask:
            assert {s["threshold"] for s in rec["rollup"]["trace"]} == {float(ask["min_prob"])}
    sizes = live.batch_sizes[before:]
    assert sum(sizes) == len(asks) and max(sizes) > 1, sizes  # they did meet in the batcher


BAD_FIELDS = [  # (fields, words in the one-line detail)
    ({"within": "Nope"}, "within: not in the tree: 'Nope'"),
    ({"within": "cross"}, "within: more than one node has the name 'cross'"),
    ({"min_prob": "1.5"}, "min_prob: a probability threshold must lie in [0, 1], got '1.5'"),
    ({"min_prob": "nan"}, "min_prob: a probability threshold must lie in [0, 1]"),
    ({"min_prob": "-inf"}, "min_prob: a probability threshold must lie in [0, 1]"),
    ({"min_prob": "high"}, "min_prob: a probability threshold must be a number"),
    ({"min_prob_at": "9=0.5"}, "min_prob_at: level 9 does not exist; this tree's levels are 1..3"),
    ({"min_prob_at": "2:0.5"}, "min_prob_at: expected LEVEL=PROBABILITY"),
    ({"min_prob_at": "2=2"}, "min_prob_at level 2: a probability threshold must lie in [0, 1]"),
]


@pytest.mark.parametrize("fields,words", BAD_FIELDS, ids=[str(f) for f, _ in BAD_FIELDS])
def test_bad_fields_get_one_line_422(live, fields, words):
    status, body = post_form(live.base, png(0), **fields)
    assert status == 422, body
    detail = body["detail"]
    assert isinstance(detail, str) and words in detail and "\n" not in detail and "Traceback" not in detail


def test_cli_serve_defaults_answer_requests_without_fields(run_dir, monkeypatch, capsys):
    uvicorn = pytest.importorskip("uvicorn")
    from conftest import serving

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **_: apps.append(app))
    assert main(["serve", str(run_dir), "--min-prob", "0.6", "--min-prob-at", "1=0.3", "--within", "vertical"]) == 0
    with serving(apps[0]) as port:
        base = f"http://127.0.0.1:{port}"
        health = json.load(urllib.request.urlopen(base + "/health", timeout=10))
        assert health["answers"] == {"within": "within vertical", "allowed_classes": 6,
                                     "min_prob": {"1": 0.3, "2": 0.6, "3": 0.6}, "ranks": []}
        status, body = post_form(base, png(0))
        rec = body["results"][0]
        assert status == 200 and rec["allowed"]["description"] == "within vertical" and rec["path"][0] == "vertical"
        assert [s["threshold"] for s in rec["rollup"]["trace"]] == [0.3, 0.6, 0.6]
        # a field replaces its own default only: this request's thresholds, the server's restriction
        status, body = post_form(base, png(0), min_prob="0.1")
        rec = body["results"][0]
        assert [s["threshold"] for s in rec["rollup"]["trace"]] == [0.1] * 3 and rec["path"][0] == "vertical"
    # bad defaults end in one line before anything is served
    for flags, words in [(["--within", "Nope"], "--within: not in the tree: 'Nope'"),
                         (["--min-prob-at", "9=0.5"], "--min-prob-at: level 9 does not exist")]:
        assert main(["serve", str(run_dir), *flags]) == 1
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err
    assert len(apps) == 1
