"""`cflow-ad serve`: the model behind HTTP for a line's software, and a web page for people.

The model is loaded once, after its port is bound. Every request is checked before it costs any
inference: the body size (413), the content type and the image format (415), the decode and the pixel
count (400 / 413), each with a one-line message. A request that sends a body is admitted from its first
byte: at most `max_concurrency` run and `max_queue` more wait or are still uploading, and the rest get
503 at once, so latency and memory stay bounded under overload instead of growing without limit. A body
is spooled to a temporary file past `SPOOL_BYTES` and must arrive within `upload_timeout_s` (408).
Inference runs in worker threads, `max_concurrency` at a time, each with its share of the threads.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from . import __version__
from .device import available_cores
from .errors import BrokenModelError, CflowInputError, ImageFormatError, ImageTooLargeError
from .images import UPLOAD_FORMATS, read_scaled
from .inference import Inspector, check_onnx_precision, is_onnx_file
from .thresholds import ScoreScale
from .visualize import colour_bar, png_bytes

MAX_REGION_HEADER = 20
IMAGE_TYPES = ("image/png", "image/jpeg", "image/bmp", "image/tiff", "image/webp", "application/octet-stream")
OUTPUTS = ("json", "overlay", "mask", "heatmap")
# A body is held in memory up to this size and spooled to a temporary file beyond: the requests waiting in
# the queue, their uploads included, then hold at most this much each.
SPOOL_BYTES = 1 << 20
KEEP_ALIVE_S = 5  # an idle connection is closed after this


@dataclass
class Limits:
    """What one request, and all at once, may cost the service. Each field is a `serve` flag; `floor` is its
    least valid value (above it, for a float), so that no limit crashes the service or refuses every request."""

    max_upload_mb: float = field(default=20.0, metadata={"help": "largest request body in MB (413 above)", "floor": 0})
    max_pixels: int = field(default=40_000_000, metadata={
        "help": "largest image in pixels, width x height (413 above)", "floor": 1})
    max_concurrency: int = field(default=2, metadata={
        "help": "inferences at once (at most --threads); each gets --threads / this many threads", "floor": 1})
    max_queue: int = field(default=32, metadata={
        "help": "requests that may wait for inference, those still uploading included (503 above)", "floor": 0})
    max_output_side: int = field(default=2048, metadata={
        "help": "longest side in px to which a larger upload is decoded and its overlay, heat map and mask drawn (not"
                " below the model's input size): memory per request is bounded by this, not by the upload;"
                " regions and areas stay in the upload's pixels", "floor": 1})
    upload_timeout_s: float = field(default=30.0, metadata={
        "help": "seconds a request body may take to arrive (408 after)", "floor": 0})
    max_connections: int = field(default=100, metadata={
        "help": "open connections at once, idle ones included (503 above)", "floor": 1})

    def __post_init__(self):
        for f in fields(self):
            value, floor, flag = getattr(self, f.name), f.metadata["floor"], "--" + f.name.replace("_", "-")
            if isinstance(f.default, float):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                        or value <= floor:
                    raise CflowInputError(f"{flag} {value} is invalid: use a number above {floor}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < floor:
                raise CflowInputError(f"{flag} {value} is invalid: use a whole number of at least {floor}")


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class Admission:
    """ASGI middleware for requests with a body: counted against the queue from their first byte, not from
    their last (40 stalled uploads once held 750 MB while /health said none were waiting); 503 beyond
    `max_concurrency + max_queue`, 413 beyond `max_upload_mb` (a declared Content-Length before anything is
    read), 408 after `upload_timeout_s`; the body spooled past `SPOOL_BYTES`, then replayed to the app.
    A refusal closes the connection, so that a client which goes on sending costs nothing more."""

    def __init__(self, app, limits: Limits, stats: dict):
        self.app, self.limits, self.stats = app, limits, stats
        self.max_bytes = int(limits.max_upload_mb * 1e6)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_big()(scope, receive, send)
        stats = self.stats
        if stats["waiting"] >= self.limits.max_queue + self.limits.max_concurrency:
            stats["rejected_busy"] += 1
            busy = _error(503, "server busy: too many requests waiting; retry shortly",
                          {"Retry-After": "1", "Connection": "close"})
            return await busy(scope, receive, send)
        stats["waiting"] += 1
        try:
            with tempfile.SpooledTemporaryFile(SPOOL_BYTES) as body:
                stats["uploading"] += 1
                try:
                    refusal = await self._spool(receive, body)
                finally:
                    stats["uploading"] -= 1
                if refusal is not None:
                    return await refusal(scope, receive, send)
                size, done = body.tell(), False
                body.seek(0)

                async def replay():
                    nonlocal done
                    if done:
                        return await receive()
                    chunk = body.read(SPOOL_BYTES)
                    done = body.tell() >= size
                    return {"type": "http.request", "body": chunk, "more_body": not done}

                await self.app(scope, replay, send)
        finally:
            stats["waiting"] -= 1

    def _too_big(self) -> JSONResponse:
        return _error(413, f"upload larger than the limit of {self.limits.max_upload_mb:g} MB: send a smaller image",
                      {"Connection": "close"})

    async def _spool(self, receive, body) -> JSONResponse | None:
        """Write the request body into `body`: None once it is complete, else the answer to refuse it with."""
        size = 0
        try:
            async with asyncio.timeout(self.limits.upload_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":  # nobody reads the answer
                        return _error(400, "the client went away before its upload was complete")
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_bytes:
                        return self._too_big()
                    body.write(chunk)
                    if not message.get("more_body"):
                        return None
        except TimeoutError:
            return _error(408, f"upload not complete after {self.limits.upload_timeout_s:g} s: send it at once, or"
                               " raise --upload-timeout-s", {"Connection": "close"})


async def _upload(request: Request) -> tuple[bytes, str] | JSONResponse:
    """The image bytes and a name, from a multipart form field 'file' or a raw image body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as exc:  # starlette raises several parser errors for a malformed form
            return _error(400, f"malformed multipart form ({exc}): send the image in a form field named 'file'")
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            return _error(400, "no file in the form: send the image in a form field named 'file'")
        part_type = (upload.content_type or "application/octet-stream").split(";")[0].strip().lower()
        if part_type not in IMAGE_TYPES:
            return _error(415, f"file '{upload.filename}' is {part_type}, not an image: send a PNG, JPEG, BMP, TIFF or WebP")
        return await upload.read(), upload.filename or "upload"
    if ctype in IMAGE_TYPES:
        return await request.body(), request.query_params.get("filename", "upload")
    return _error(415, f"content type '{ctype or 'none'}' is not an image: send image/png, image/jpeg, ... or a"
                       " multipart form with a field named 'file'")


def create_app(inspector: Inspector, limits: Limits | None = None) -> Admission:
    """The service around one loaded model, as an ASGI app. No API pages (/docs, /redoc, /openapi.json):
    they load scripts from a CDN, which breaks offline and puts third-party code on the service's origin."""
    limits = limits or Limits()
    app = FastAPI(title="cflow-ad", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    slots = asyncio.Semaphore(limits.max_concurrency)
    stats = {"started": time.time(), "requests": 0, "waiting": 0, "uploading": 0, "rejected_busy": 0}
    size = inspector.config  # its input size and aspect handling
    side = max(limits.max_output_side, *inspector.frame.size)
    page = resources.files("cflow_ad").joinpath("web/index.html").read_text()

    def infer(data: bytes, name: str, output: str):
        t0 = time.perf_counter()
        x, original, stored = read_scaled(data, size, name, limits.max_pixels, side, UPLOAD_FORMATS)
        t1 = time.perf_counter()
        verdict = inspector(x[None], [original], [stored])[0]
        t2 = time.perf_counter()
        image = {"overlay": inspector.overlay, "mask": inspector.mask_image,
                 "heatmap": inspector.heat, "json": None}[output]
        png = png_bytes(image(verdict)) if image else None
        timing = {"decode_ms": 1e3 * (t1 - t0), "inference_ms": 1e3 * (t2 - t1),
                  "total_ms": 1e3 * (time.perf_counter() - t0)}
        return {"file": name, **inspector.describe(verdict), "timing": timing}, png

    def get(path: str, **kwargs):
        """A GET route that answers HEAD too, as health checks send it (FastAPI's GET alone says 405)."""
        return app.api_route(path, methods=["GET", "HEAD"], **kwargs)

    @get("/", response_class=HTMLResponse)
    async def index():
        return page

    legend = png_bytes(colour_bar(256, inspector.heat_scale))

    @get("/legend.png")
    async def legend_png():
        """The heat map's colour bar: its colours and thresholds are fixed by the model."""
        return Response(legend, media_type="image/png")

    @get("/health")
    async def health():
        """`waiting`: requests admitted and not answered yet, `uploading` of them still arriving."""
        return {"status": "ok", "version": __version__, "uptime_s": round(time.time() - stats["started"], 1),
                "requests": stats["requests"], "waiting": stats["waiting"], "uploading": stats["uploading"],
                "rejected_busy": stats["rejected_busy"]}

    @get("/model")
    async def model():
        t = inspector.thresholds
        return {"config": json.loads(inspector.config.to_json()), "runtime": inspector.runtime, "quantize": inspector.quantize,
                "device": inspector.device, "thresholds": t.summary() if t else None,
                "heat_scale": {**asdict(inspector.heat_scale), "top": float(inspector.heat_scale.raw(ScoreScale.TOP))},
                "limits": asdict(limits)}

    @app.post("/predict")
    async def predict(request: Request, output: str = "json"):
        """An image (form field 'file', or a raw image body) -> JSON with score, label, thresholds and
        timing; `output=overlay|mask|heatmap` returns that PNG instead, with the facts in X-Cflow-* headers.
        Admission (`Admission`) has counted it and spooled its body; it is read into memory in its slot."""
        if output not in OUTPUTS:
            return _error(400, f"unknown output '{output}': choose one of {', '.join(OUTPUTS)}")
        if output == "mask" and inspector.thresholds is None:
            return _error(409, "this model has no thresholds, so no mask: run 'cflow-ad calibrate' first")
        async with slots:
            got = await _upload(request)
            if isinstance(got, Response):
                return got
            try:
                result, png = await run_in_threadpool(infer, *got, output)
            except CflowInputError as exc:
                status = (413 if isinstance(exc, ImageTooLargeError) else 415 if isinstance(exc, ImageFormatError)
                          else 500 if isinstance(exc, BrokenModelError) else 400)
                return _error(status, str(exc))
        stats["requests"] += 1
        if png is None:
            return result
        headers = {"X-Cflow-Score": "None" if result["score"] is None else f"{result['score']:.4g}",
                   "X-Cflow-Raw-Score": f"{result['raw_score']:.6g}", "X-Cflow-Label": str(result["label"]),
                   "X-Cflow-Image-Threshold": str(result["image_threshold"]),
                   "X-Cflow-Defect-Area": str(result["defect_area_px"]),
                   "X-Cflow-Regions": str(result["region_count"]),
                   # the first MAX_REGION_HEADER region boxes, x,y,width,height in the image's pixels
                   "X-Cflow-Region-Boxes": ";".join(
                       "{x},{y},{width},{height}".format(**r["box"]) for r in (result["regions"] or [])[:MAX_REGION_HEADER]),
                   "X-Cflow-Total-Ms": f"{result['timing']['total_ms']:.1f}"}
        return Response(png, media_type="image/png", headers=headers)

    return Admission(app, limits, stats)


def bind(host: str, port: int) -> socket.socket:
    """The service's socket, bound before the model loads: a port in use or out of range is a one-line error
    at once, not a "serving on" line and then an exit. It listens once the model is loaded (uvicorn), so that
    no client waits on a service that is not there yet."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise CflowInputError(f"--port {port} is not a port: use one from 1 to 65535")
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart reuses the port
        sock.bind(address)
        return sock
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise CflowInputError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): choose another --port, or"
                              " stop what is using it") from None


def thread_plan(threads: int | None, max_concurrency: int) -> tuple[int, int]:
    """(inferences at once, threads for each) so that together they use `threads` (default: the cores here):
    fewer inferences at once where there are fewer threads, never `max_concurrency` x 1 threads beyond them.
    Parallel requests with fewer threads each beat one at a time with all of them: 35 vs 23 req/s on 2 cores
    (benchmarks/serve_load.py); more threads than cores in total collapses throughput."""
    total = max(1, threads or available_cores())
    concurrency = min(max_concurrency, total)
    return concurrency, total // concurrency


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000, runtime: str = "onnx",
          limits: Limits | None = None, target_fpr: float | None = None, image_threshold: float | None = None,
          pixel_threshold: float | None = None, device: str = "auto", precision: str = "fp32",
          min_defect_area: int = 0, threads: int | None = None, quantize: str | None = None,
          all_regions: bool = False, flow_precision: str = "fp32") -> None:
    """Bind the port, load the model once on `device` and serve it until interrupted (uploads are decoded in
    the request threads, so no loader workers). An .onnx file is served without PyTorch."""
    import uvicorn

    limits = limits or Limits()
    sock = bind(host, port)
    try:
        concurrency, share = thread_plan(threads, limits.max_concurrency)
        limits = replace(limits, max_concurrency=concurrency)
        thresholds = (target_fpr, image_threshold, pixel_threshold)
        if is_onnx_file(model):
            check_onnx_precision(precision, flow_precision)
            inspector = Inspector(model, "onnx", *thresholds, None, min_defect_area, share, device, quantize,
                                  all_regions)
        else:
            from .checkpoint import read_metadata
            from .config import CFlowConfig
            from .device import Compute, set_threads
            from .model import METHOD_CLASSES

            if runtime == "onnx" and "onnx" not in METHOD_CLASSES[
                    CFlowConfig.from_dict(read_metadata(model)["config"]).method].runtimes:
                runtime = "torch"  # the method has no ONNX form (SPADE's gallery search)
            share = set_threads(share)
            compute = Compute(device, precision, workers=0, flow_precision=flow_precision)
            inspector = Inspector(model, runtime, *thresholds, compute, min_defect_area, share, quantize=quantize,
                                  all_regions=all_regions)
        config = uvicorn.Config(create_app(inspector, limits), log_level="warning",
                                limit_concurrency=limits.max_connections, timeout_keep_alive=KEEP_ALIVE_S)
        print(f"cflow-ad: serving {model} ({inspector.config.method}, {inspector.runtime} on {inspector.device},"
              f" {concurrency} x {share} threads) on http://{host}:{port}", flush=True)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
