"""The prediction server: FastAPI app over one :class:`~hiervision.serve.predictor.ImagePredictor`.

``POST /predict`` (multipart, field ``file`` repeatable; optional fields ``within``, ``min_prob``,
``min_prob_at`` restrict and roll up this request's answers) → one record per image; ``GET /taxonomy`` (the
whole tree); ``GET /taxonomy/nodes`` (a few nodes with a page of their children, what the page reads of
a big tree: :mod:`hiervision.serve.nodes`); ``GET /health``; ``GET /`` the web page; ``/docs`` (Swagger
UI served from the ``fastapi-offline`` package: no CDN) and ``/openapi.json``. Every bad request is
answered with a 4xx and ``{"detail": "one line"}``; none reaches the model.

Faults a client can cause stay with that client: a body that arrives too slowly (a pause longer
than ``read_timeout_s``, or under ``min_body_rate`` bytes/s on average) is answered 408 and the
connection closed; a client that goes away mid-upload is one log line; past ``max_queue`` images
waiting for the model, new requests get 503 with ``Retry-After`` instead of an unbounded queue.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from hiervision.records import TreeView
from hiervision.restrict import Allowed
from hiervision.rollup import Thresholds
from hiervision.serve.batching import MicroBatcher, QueueFull
from hiervision.serve.connections import guarded_protocol
from hiervision.serve.images import DEFAULT_MAX_PIXELS, ImageRejected, decode_image
from hiervision.serve.nodes import MAX_IDS, BadNodeId, node_record, parse_ids, path_siblings
from hiervision.serve.predictor import ImagePredictor

__all__ = ["Limits", "create_app"]

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("hiervision.serve")


class Limits(BaseModel):
    """What one request may ask for (beyond the sizes: 413), how slowly it may arrive (408) and how many
    images may wait for the model (503)."""

    max_files: int = 64
    max_body_bytes: int = 32 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    #: longest pause between two pieces of a request body, in seconds
    read_timeout_s: float = 10.0
    #: slowest average body rate accepted (bytes/s), counted after the first ``read_timeout_s``
    min_body_rate: float = 8 * 1024
    #: most images waiting for (or in) the model at once; more get 503
    max_queue: int = 256
    #: most request-body bytes held at once, over every request being read or decoded; more get 503
    max_inflight_bytes: int = 256 * 1024 * 1024
    #: most open connections; past it the oldest one still sending headers is closed (``serve.connections``)
    max_connections: int = 512
    #: longest a connection may take to send a request's headers, in seconds
    header_timeout_s: float = 10.0


class Alternative(BaseModel):
    path: list[str]
    path_ids: list[int]
    probability: float


class Record(BaseModel):
    """One image's answer (extra fields a backend adds are passed through)."""

    model_config = ConfigDict(extra="allow")
    file: str
    path: list[str]
    path_ids: list[int]
    path_probability: float
    node_probabilities: list[float]
    top_k: list[Alternative]
    node_scores: list[float] | None = None
    scores_above: dict[int, float] | None = None
    siblings: list[dict[str, Any]] | None = None
    hedged: Any | None = None


_SCORES_ABOVE = ("also return the score of every node whose score is at least this, by node id (a big tree's "
                 "probabilities without sending all of them)")


class PredictResponse(BaseModel):
    results: list[Record]


@dataclass(frozen=True)
class _Answers:
    """One request's restriction and roll-up. ``key`` (the fields as sent) decides which images may share
    a forward pass: only those asking the same; a request without fields has none (the server's defaults)."""

    key: tuple[str | None, str | None, str | None]
    allowed: Allowed | None
    thresholds: Thresholds | None


def _field(value: str | None) -> str | None:
    """A form field as given, ``None`` when absent or blank (an empty page input means "not set")."""
    return value.strip() if value is not None and value.strip() else None


def _resolve_answers(predictor: ImagePredictor, within: str | None, min_prob: str | None,
                     min_prob_at: str | None) -> _Answers | None:
    """The request's ``within``/``min_prob``/``min_prob_at`` for this model; ``None`` when none is set.
    A bad value is a :class:`ValueError` of one line naming the field."""
    key = (_field(within), _field(min_prob), _field(min_prob_at))
    if key == (None, None, None):
        return None
    end_nodes = getattr(predictor, "end_nodes", None)
    if end_nodes is None:
        raise ValueError("within, min_prob, min_prob_at: this server's model does not take them")
    if getattr(predictor, "multi_label", False):
        raise ValueError("within, min_prob, min_prob_at: they apply to single-label models only")
    allowed = Allowed.of(predictor.tree, within=key[0], end_nodes=end_nodes, where=("within", "classes"))
    thresholds = Thresholds.of(predictor.tree, key[1], key[2], where=("min_prob", "min_prob_at"),
                               ranks=getattr(predictor, "ranks", ()))
    return _Answers(key, allowed, thresholds)


def _batch_runner(predictor: ImagePredictor) -> Callable[[list[tuple[Any, _Answers | None]]], list[dict[str, Any]]]:
    """The micro-batcher's ``predict``: items are ``(image, answers)``; images asking the same answers (or
    none: the defaults) share one forward pass, so no request is answered under another's options."""

    def run(items: list[tuple[Any, _Answers | None]]) -> list[dict[str, Any]]:
        groups: dict[Any, list[int]] = {}
        for i, (_, ans) in enumerate(items):
            groups.setdefault(None if ans is None else ans.key, []).append(i)
        out: list[dict[str, Any]] = [{}] * len(items)
        for idx in groups.values():
            ans, images = items[idx[0]][1], [items[i][0] for i in idx]
            recs = (predictor.predict_arrays(images) if ans is None else
                    predictor.predict_arrays(images, allowed=ans.allowed,  # type: ignore[call-arg]
                                             thresholds=ans.thresholds))
            if len(recs) != len(idx):
                raise RuntimeError(f"predictor returned {len(recs)} results for {len(idx)} images")
            for i, rec in zip(idx, recs):
                out[i] = rec
        return out

    return run


def _default_answers(predictor: ImagePredictor) -> dict[str, Any]:
    """What a request without fields is answered under (``serve --within/--min-prob``, or the sidecar's)."""
    allowed, thresholds = getattr(predictor, "allowed", None), getattr(predictor, "thresholds", None)
    return {"within": allowed.description if allowed is not None else None,
            "allowed_classes": int(allowed.ends.sum()) if allowed is not None else None,
            "min_prob": thresholds.as_dict() if thresholds is not None else None,
            "ranks": list(getattr(predictor, "ranks", ()))}


def _detail(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


class _RequestGuard:
    """ASGI middleware for ``POST /predict``: 415 unless multipart, 413 past ``max_body_bytes`` (checked on
    Content-Length and again while reading, for chunked bodies), 408 for a body that stalls or trickles
    (``read_timeout_s``, ``min_body_rate``); a client that disconnects mid-upload is logged in one line.
    The body is buffered (bounded, and over all requests at once ``max_inflight_bytes``: 503 past it) and
    replayed."""

    def __init__(self, app, limits: Limits) -> None:
        self.app, self.limits = app, limits
        self.inflight = 0  # body bytes held by requests being read or answered (one event loop: no lock)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/predict":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        ctype = headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            got = ctype.split(";")[0] or "none"
            return await _detail(415, f"content type {got}: send images as multipart/form-data, "
                                      "field 'file'")(scope, receive, send)
        lim = self.limits
        too_big = _detail(413, f"request body larger than {lim.max_body_bytes} bytes")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > lim.max_body_bytes:
            return await too_big(scope, receive, send)
        held = int(length) if length is not None and length.isdigit() else lim.max_body_bytes
        if self.inflight + held > lim.max_inflight_bytes:  # memory is bounded: shed load, never queue bytes
            return await _detail(503, f"server busy: {self.inflight:,} bytes of uploads already in flight",
                                 {"Retry-After": "1"})(scope, receive, send)
        self.inflight += held
        try:
            return await self._read_and_answer(scope, receive, send, length, too_big)
        finally:
            self.inflight -= held

    async def _read_and_answer(self, scope, receive, send, length: str | None, too_big) -> None:
        lim = self.limits
        chunks, size, more, start = [], 0, True, time.monotonic()
        while more:
            elapsed = time.monotonic() - start
            slow = elapsed > lim.read_timeout_s and size < lim.min_body_rate * elapsed
            try:
                message = None if slow else await asyncio.wait_for(receive(), lim.read_timeout_s)
            except TimeoutError:
                message = None
            if message is None:
                of = f" of {length}" if length else ""
                log.warning("%s: request body too slow (%d%s bytes in %.1f s), answered 408", _peer(scope), size,
                            of, elapsed)
                return await _detail(408, f"request body too slow: {size}{of} bytes in {elapsed:.1f} s (a pause "
                                     f"over {lim.read_timeout_s:g} s or under {lim.min_body_rate:g} bytes/s)",
                                     {"Connection": "close"})(scope, receive, send)
            if message["type"] == "http.disconnect":
                log.warning("%s: client went away mid-upload (%d bytes received)", _peer(scope), size)
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > lim.max_body_bytes:
                return await too_big(scope, receive, send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        chunks.reverse()

        async def replay():  # the chunks as they came (never joined: one copy of the body, not two)
            if chunks:
                return {"type": "http.request", "body": chunks.pop(), "more_body": bool(chunks)}
            return await receive()

        return await self.app(scope, replay, send)


def _peer(scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "client"


class _NoCache:
    """The page's files are revalidated on every load, so a new version is never served stale (plain ASGI:
    a request that ends without a response, e.g. a client gone mid-upload, passes through quietly)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == "/" or path.startswith(("/static/", "/docs"))):
            return await self.app(scope, receive, send)

        async def send_no_cache(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"cache-control", b"no-cache")]}
            await send(message)

        return await self.app(scope, receive, send_no_cache)


def _docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI from the files the ``fastapi-offline`` package ships (no CDN, works offline);
    without that package, a local page that links the OpenAPI schema."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import HTMLResponse

    try:
        import fastapi_offline
    except ImportError:
        assets = None
    else:
        assets = Path(fastapi_offline.__file__).parent / "static"
        app.mount("/docs/assets", StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        if assets is None:
            return HTMLResponse("<!doctype html><title>hiervision API</title><p>Interactive docs need "
                                "<code>pip install fastapi-offline</code> (the [serve] extra). The schema: "
                                "<a href='/openapi.json'>/openapi.json</a>.</p>")
        return get_swagger_ui_html(openapi_url="/openapi.json", title="hiervision API",
                                   swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/assets/swagger-ui.css",
                                   swagger_favicon_url="/docs/assets/favicon.png")


_PREDICT_FIELDS = (
    "Optional form fields answer this request under other options than the server's defaults (`GET /health` → "
    "`answers`): `within` restricts the answers to end classes under these nodes (comma-separated names or paths "
    "such as `Animals/Dogs`; the record's `allowed`); `min_prob` (a number in [0, 1]) and `min_prob_at` "
    "(`LEVEL=P,...`, e.g. `3=0.8,2=0.6`) roll each answer up to the deepest node of its path that meets its "
    "threshold (the record's `rollup`: where and why it stopped). A field that is sent replaces its default; a "
    "bad value is answered 422.")


def create_app(
    predictor: ImagePredictor,
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    limits: Limits | None = None,
    hedge: Callable[[dict[str, Any]], Any] | None = None,
    name: str = "model",
) -> FastAPI:
    """The app. ``hedge(record)`` (optional, :meth:`hiervision.runtime.Predictor.hedger`) adds each record's
    ``hedged`` answer."""
    limits = limits or Limits()
    batcher = MicroBatcher(_batch_runner(predictor), max_batch=max_batch, max_wait_ms=max_wait_ms,
                           max_queue=limits.max_queue)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        batcher.start()
        yield
        await run_in_threadpool(batcher.stop)

    app = FastAPI(title="hiervision", summary="Hierarchical image classification: a path in a class tree per image",
                  version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher, app.state.predictor, app.state.limits = batcher, predictor, limits
    app.add_middleware(_RequestGuard, limits=limits)
    app.add_middleware(_NoCache)
    _docs(app)
    _errors(app)

    @app.post("/predict", response_model=PredictResponse, response_model_exclude_none=True,
              summary="Predict the class path of one or more images",
              description=_PREDICT_FIELDS,
              responses={400: {"description": "not an image / truncated image"},
                         408: {"description": "request body too slow"},
                         413: {"description": "body, file count or pixel count over the limit"},
                         415: {"description": "not multipart/form-data"},
                         422: {"description": "no file field, or a bad within / min_prob / min_prob_at"},
                         503: {"description": "too many images waiting for the model: retry after Retry-After"}})
    async def predict(
        file: Annotated[list[UploadFile], File(description="image file; repeat the field for several images")],
        node_scores: Annotated[bool, Query(description="also return every node's score (to draw the tree)")] = False,
        siblings: Annotated[int, Query(ge=0, le=100, description="also return, at each level of the path, the "
                                       "parent's K most probable children (to draw a big tree)")] = 0,
        scores_above: Annotated[float | None, Query(ge=0, le=1, description=_SCORES_ABOVE)] = None,
        within: Annotated[str | None, Form(description="answer only end classes under these nodes (comma-separated "
                                           "names or paths such as Animals/Dogs)")] = None,
        min_prob: Annotated[str | None, Form(description="roll each answer up to the deepest node on its path "
                                             "whose probability is at least this (a number in [0, 1])")] = None,
        min_prob_at: Annotated[str | None, Form(description="a threshold per level (1 = under the root) or rank "
                                                "(/health's answers.ranks), e.g. 3=0.8,2=0.6 or species=0.8; "
                                                "other levels take min_prob (or 0)")] = None,
    ) -> dict[str, Any]:
        if len(file) > limits.max_files:
            raise HTTPException(413, f"{len(file)} files in one request, more than the limit of {limits.max_files}")
        try:  # the fields first: a bad one costs no decoding
            answers = await run_in_threadpool(_resolve_answers, predictor, within, min_prob, min_prob_at)
        except ValueError as e:
            raise HTTPException(422, " ".join(str(e).split())) from None
        try:
            batcher.check_room(len(file))  # shed load before decoding anything
            arrays = []
            for i, upload in enumerate(file):
                data = await upload.read()
                label = upload.filename or f"file #{i + 1}"
                arrays.append(await run_in_threadpool(decode_image, data, label, predictor.in_chans,
                                                      predictor.image_size, limits.max_pixels))
            futures = batcher.submit_many([(a, answers) for a in arrays])  # all or none
        except QueueFull as e:
            raise HTTPException(503, f"server busy: {e}", headers={"Retry-After": "1"}) from None
        try:
            records = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        except Exception as e:
            raise HTTPException(500, f"prediction failed: {type(e).__name__}: {e}") from None
        broken = next((r["error"] for r in records if "error" in r), None)
        if broken is not None:  # e.g. a NaN from the model: never sent as an answer
            raise HTTPException(500, f"prediction failed: {broken}")
        return {"results": [_finish(rec, upload.filename or f"file #{i + 1}", predictor.tree, hedge, node_scores,
                                    siblings, scores_above) for i, (upload, rec) in enumerate(zip(file, records))]}

    _info_routes(app, name)
    return app


def _finish(rec: dict[str, Any], name: str, tree: TreeView, hedge: Callable[[dict[str, Any]], Any] | None,
            node_scores: bool, siblings: int, scores_above: float | None = None) -> dict[str, Any]:
    """The record as answered: its file name, the hedged answer (``runtime.Predictor.hedger``), the path's
    siblings, ``scores_above`` (the nodes scoring at least that, by id) and ``node_scores`` (every node's, kept
    only on request), all read from the record's scores."""
    rec = {**rec, "file": name}
    if hedge is not None:
        rec["hedged"] = hedge(rec)
    if siblings:
        rec["siblings"] = path_siblings(tree, rec["path_ids"], rec["node_scores"], siblings)
    if scores_above is not None:
        scores = np.asarray(rec["node_scores"], dtype=np.float64)
        ids = np.flatnonzero(scores >= scores_above)
        rec["scores_above"] = {int(n): round(float(scores[n]), 6) for n in ids if n}
    if not node_scores:
        rec.pop("node_scores", None)
    return rec


def _errors(app: FastAPI) -> None:
    """Rejected images and malformed requests answer one line (``{"detail": ...}``), never a traceback."""

    @app.exception_handler(ImageRejected)
    async def _rejected(_: Request, e: ImageRejected) -> JSONResponse:
        return _detail(e.status, str(e))

    @app.exception_handler(BadNodeId)
    async def _bad_node(_: Request, e: BadNodeId) -> JSONResponse:
        return _detail(e.status, str(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in err.get('loc', ())[1:]) or 'request'}: {err.get('msg', 'invalid')}"
                 for err in e.errors()]
        hint = " (send images as multipart field 'file')" if request.url.path == "/predict" else ""
        return _detail(422, "; ".join(parts) + hint)


def _info_routes(app: FastAPI, name: str) -> None:
    """``/taxonomy``, ``/taxonomy/nodes``, ``/health``, the page at ``/`` and its static files."""
    predictor, batcher, limits = app.state.predictor, app.state.batcher, app.state.limits
    tree = predictor.tree
    #: end classes (where an answer may stop), not every node: what "N classes" means to a reader
    classes = int(tree.end_mask(getattr(predictor, "end_nodes", "leaves")).sum())

    @app.get("/taxonomy", summary="The class tree: nodes with id, name and parent (node 0 is the root)",
             description="The whole tree in one answer (about 40 bytes a node: 4 MB at 10^5 nodes). "
                         "`GET /taxonomy/nodes` reads a few nodes at a time.")
    async def get_taxonomy() -> dict[str, Any]:
        nodes = [{"id": i, "name": n, "parent": p} for i, (n, p) in enumerate(zip(tree.names, tree.parents))]
        return {"nodes": nodes, "max_depth": tree.max_depth}

    @app.get("/taxonomy/nodes", summary="A few nodes, each with its path and a page of its children",
             responses={404: {"description": "an id that is not a node"}, 422: {"description": "an id that is "
                                                                                 "not an integer, or too many"}})
    async def get_nodes(
        ids: Annotated[list[str], Query(description=f"node ids, comma-separated or repeated (at most {MAX_IDS}; "
                                        "0 is the root)")],
        offset: Annotated[int, Query(ge=0, description="first child of each node to list (id order)")] = 0,
        limit: Annotated[int, Query(ge=0, le=1000, description="most children listed per node")] = 50,
    ) -> dict[str, Any]:
        return {"nodes": [node_record(tree, v, offset, limit) for v in parse_ids(ids, tree.num_nodes)]}

    @app.get("/health", summary="Liveness and what is being served",
             description="`classes`: end classes (where an answer may stop); `nodes`: every node under the root; "
                         "`answers`: the defaults a request without fields is answered under (`within`: the "
                         "restriction or null, `allowed_classes`, `min_prob`: the roll-up threshold per level "
                         "or null).")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": name, "classes": classes, "nodes": tree.num_nodes - 1,
                "max_depth": tree.max_depth, "answers": _default_answers(predictor), "in_chans": predictor.in_chans,
                "image_size": list(predictor.image_size) if predictor.image_size else None,
                "max_batch": batcher.max_batch, "max_wait_ms": batcher.max_wait * 1000,
                "limits": json.loads(limits.model_dump_json()), "batches_run": len(batcher.batch_sizes),
                "queued": batcher.pending}

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")


def serve(path: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 32, max_wait_ms: float = 5.0,
          top_k: int = 3, limits: Limits | None = None, hedge_accuracy: float | None = None,
          beam_width: int | None = None, decode: str | None = None,
          answers: Callable[[TreeView, str, dict], tuple[Allowed | None, Thresholds | None]] | None = None) -> None:
    """Load ``path`` (run folder or .onnx) and serve it with uvicorn until interrupted. ``hedge_accuracy``:
    add each image's hedged answer at that accuracy target (λ from the run's ``decisions.json``, or the
    sidecar's copy of it for an ``.onnx``); ``beam_width``: the search width of a decoder with a beam search;
    ``decode``: the decision rule
    (see :func:`load_predictor`); ``answers(tree, end_nodes, sidecar)`` → ``(allowed, thresholds)``: the defaults
    of requests without fields (``serve --within/--classes/--min-prob/--min-prob-at`` over the sidecar's or the
    run's own) — resolved once the model's tree is known, so a bad name fails before serving."""
    import uvicorn

    from hiervision.serve.predictor import load_predictor

    predictor = load_predictor(path, top_k=top_k, beam_width=beam_width, decode=decode)
    if answers is not None:
        allowed, thresholds = answers(predictor.tree, predictor.end_nodes, predictor.runtime.sidecar)
        if allowed is not None and predictor.multi_label:
            raise ValueError("--within/--classes apply to single-label models only")
        predictor.allowed, predictor.thresholds = allowed, thresholds
    hedge = predictor.runtime.hedger(hedge_accuracy) if hedge_accuracy is not None else None
    app = create_app(predictor, max_batch=max_batch, max_wait_ms=max_wait_ms, limits=limits, hedge=hedge,
                     name=str(path))
    lim = limits or Limits()
    uvicorn.run(app, host=host, port=port, log_level="info",
                http=guarded_protocol(lim.max_connections, lim.header_timeout_s))
