"""The prediction server: FastAPI app over one :class:`~hiervision.serve.predictor.ImagePredictor`.

``POST /predict`` (multipart, field ``file`` repeatable) → one record per image; ``GET /taxonomy``;
``GET /health``; ``GET /`` the web page; ``/docs`` and ``/openapi.json`` from FastAPI. Every bad
request is answered with a 4xx and ``{"detail": "one line"}``; none reaches the model.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from hiervision.serve.batching import MicroBatcher
from hiervision.serve.images import DEFAULT_MAX_PIXELS, ImageRejected, decode_image
from hiervision.serve.predictor import ImagePredictor

__all__ = ["Limits", "create_app"]

STATIC = Path(__file__).parent / "static"


class Limits(BaseModel):
    """What one request may ask for; beyond these the server answers 413."""

    max_files: int = 64
    max_body_bytes: int = 32 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS


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
    hedged: Any | None = None


class PredictResponse(BaseModel):
    results: list[Record]


def _detail(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status)


class _RequestGuard:
    """ASGI middleware for ``POST /predict``: 415 unless multipart, 413 past ``max_body_bytes`` (checked on
    Content-Length and again while reading, for chunked bodies). The body is buffered (bounded) and replayed."""

    def __init__(self, app, max_body_bytes: int) -> None:
        self.app, self.max_body = app, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/predict":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        ctype = headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            got = ctype.split(";")[0] or "none"
            return await _detail(415, f"content type {got}: send images as multipart/form-data, "
                                      "field 'file'")(scope, receive, send)
        too_big = _detail(413, f"request body larger than {self.max_body} bytes")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await too_big(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await too_big(scope, receive, send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def create_app(
    predictor: ImagePredictor,
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    limits: Limits | None = None,
    hedge: Callable[[dict[str, Any]], Any] | None = None,
    name: str = "model",
) -> FastAPI:
    """The app. ``hedge(record)`` (optional) adds each record's ``hedged`` answer (the decisions module)."""
    limits = limits or Limits()
    batcher = MicroBatcher(predictor.predict_arrays, max_batch=max_batch, max_wait_ms=max_wait_ms)
    tree = predictor.tree

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        batcher.start()
        yield
        await run_in_threadpool(batcher.stop)

    app = FastAPI(title="hiervision", summary="Hierarchical image classification: a path in a class tree per image",
                  version="1", lifespan=lifespan)
    app.state.batcher, app.state.predictor, app.state.limits = batcher, predictor, limits
    app.add_middleware(_RequestGuard, max_body_bytes=limits.max_body_bytes)

    @app.exception_handler(ImageRejected)
    async def _rejected(_: Request, e: ImageRejected) -> JSONResponse:
        return _detail(e.status, str(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in err.get('loc', ())[1:]) or 'request'}: {err.get('msg', 'invalid')}"
                 for err in e.errors()]
        return _detail(422, "; ".join(parts) + " (send images as multipart field 'file')")

    @app.post("/predict", response_model=PredictResponse, response_model_exclude_none=True,
              summary="Predict the class path of one or more images",
              responses={400: {"description": "not an image / truncated image"},
                         413: {"description": "body, file count or pixel count over the limit"},
                         415: {"description": "not multipart/form-data"}})
    async def predict(
        file: Annotated[list[UploadFile], File(description="image file; repeat the field for several images")],
        node_scores: Annotated[bool, Query(description="also return every node's score (to draw the tree)")] = False,
    ) -> dict[str, Any]:
        if len(file) > limits.max_files:
            raise HTTPException(413, f"{len(file)} files in one request, more than the limit of {limits.max_files}")
        arrays = []
        for i, upload in enumerate(file):
            data = await upload.read()
            label = upload.filename or f"file #{i + 1}"
            arrays.append(await run_in_threadpool(decode_image, data, label, predictor.in_chans,
                                                  predictor.image_size, limits.max_pixels))
        try:
            records = await asyncio.gather(*(asyncio.wrap_future(batcher.submit(a)) for a in arrays))
        except Exception as e:
            raise HTTPException(500, f"prediction failed: {type(e).__name__}: {e}") from None
        results = []
        for upload, i, rec in zip(file, range(len(file)), records):
            rec = {**rec, "file": upload.filename or f"file #{i + 1}"}
            if hedge is not None:  # the hedged answer (hiervision.posthoc.hedger)
                rec["hedged"] = hedge(rec)
            if not node_scores:
                rec.pop("node_scores", None)
            results.append(rec)
        return {"results": results}

    @app.get("/taxonomy", summary="The class tree: nodes with id, name and parent (node 0 is the root)")
    async def get_taxonomy() -> dict[str, Any]:
        nodes = [{"id": i, "name": n, "parent": p} for i, (n, p) in enumerate(zip(tree.names, tree.parents))]
        return {"nodes": nodes, "max_depth": tree.max_depth}

    @app.get("/health", summary="Liveness and what is being served")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": name, "classes": tree.num_nodes - 1, "in_chans": predictor.in_chans,
                "image_size": list(predictor.image_size) if predictor.image_size else None,
                "max_batch": batcher.max_batch, "max_wait_ms": batcher.max_wait * 1000,
                "limits": json.loads(limits.model_dump_json()), "batches_run": len(batcher.batch_sizes)}

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.middleware("http")
    async def _revalidate(request: Request, call_next):
        """The page's files are revalidated on every load, so a new version is never served stale."""
        response = await call_next(request)
        if request.url.path == "/" or request.url.path.startswith("/static/"):
            response.headers["Cache-Control"] = "no-cache"
        return response

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def serve(path: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 32, max_wait_ms: float = 5.0,
          top_k: int = 3, limits: Limits | None = None, hedge_accuracy: float | None = None,
          beam_width: int | None = None, decode: str | None = None) -> None:
    """Load ``path`` (run folder or .onnx) and serve it with uvicorn until interrupted. ``hedge_accuracy``:
    add each image's hedged answer at that accuracy target (λ from the run's ``decisions.json``);
    ``beam_width``: the search width of a decoder with a beam search; ``decode``: the decision rule
    (see :func:`load_predictor`)."""
    import uvicorn

    from hiervision.posthoc import hedger
    from hiervision.serve.predictor import load_predictor

    hedge = hedger(path, hedge_accuracy) if hedge_accuracy is not None else None
    predictor = load_predictor(path, top_k=top_k, beam_width=beam_width, decode=decode)
    app = create_app(predictor, max_batch=max_batch, max_wait_ms=max_wait_ms, limits=limits, hedge=hedge,
                     name=str(path))
    uvicorn.run(app, host=host, port=port, log_level="info")
