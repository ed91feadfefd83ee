"""`cflow-ad serve`: the model behind HTTP for a line's software, and a web page for people.

The model is loaded once. Every request is checked before it costs any inference: the body
size (413), the content type (415), the decode and the pixel count (400 / 413), each with a
one-line message. Inference runs in worker threads, `max_concurrency` at a time, each with its
share of the threads; at most
`max_queue` more requests wait, and the rest get 503 at once, so latency stays bounded
under overload instead of growing without limit.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from . import __version__
from .device import available_cores
from .errors import CflowInputError, ImageFormatError, ImageTooLargeError
from .images import UPLOAD_FORMATS, read_scaled
from .inference import Inspector, is_onnx_file
from .thresholds import ScoreScale
from .visualize import colour_bar, png_bytes

MAX_REGION_HEADER = 20
IMAGE_TYPES = ("image/png", "image/jpeg", "image/bmp", "image/tiff", "image/webp", "application/octet-stream")
OUTPUTS = ("json", "overlay", "mask", "heatmap")


@dataclass
class Limits:
    """What one request may cost the service."""

    max_upload_mb: float = field(default=20.0, metadata={"help": "largest request body in MB (413 above)"})
    max_pixels: int = field(default=40_000_000, metadata={"help": "largest image in pixels, width x height (413 above)"})
    max_concurrency: int = field(default=2, metadata={"help": "inferences at once; each gets --threads / this many threads"})
    max_queue: int = field(default=32, metadata={"help": "requests that may wait for inference (503 above)"})
    max_output_side: int = field(default=2048, metadata={
        "help": "longest side in px to which a larger upload is decoded and its overlay, heat map and mask drawn (not"
                " below the model's input size): memory per request is bounded by this, not by the upload;"
                " regions and areas stay in the upload's pixels"})


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: read a request body up to a limit, answer 413 beyond it, then replay it.
    The declared Content-Length is refused before anything is read."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT"):
            return await self.app(scope, receive, send)
        too_big = _error(413, f"upload larger than the limit of {self.max_bytes / 1e6:g} MB: send a smaller image")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await too_big(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await too_big(scope, receive, send)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


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


def create_app(inspector: Inspector, limits: Limits | None = None) -> BodyLimit:
    """The service around one loaded model, as an ASGI app."""
    limits = limits or Limits()
    app = FastAPI(title="cflow-ad", version=__version__,
                  description="Anomaly detection with localization: POST an image to /predict.")
    slots = asyncio.Semaphore(limits.max_concurrency)
    stats = {"started": time.time(), "requests": 0, "waiting": 0, "rejected_busy": 0}
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

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return page

    legend = png_bytes(colour_bar(256, inspector.heat_scale))

    @app.get("/legend.png", include_in_schema=False)
    async def legend_png():
        """The heat map's colour bar: its colours and thresholds are fixed by the model."""
        return Response(legend, media_type="image/png")

    @app.get("/health")
    async def health():
        return {"status": "ok", "version": __version__, "uptime_s": round(time.time() - stats["started"], 1),
                "requests": stats["requests"], "waiting": stats["waiting"], "rejected_busy": stats["rejected_busy"]}

    @app.get("/model")
    async def model():
        t = inspector.thresholds
        return {"config": json.loads(inspector.config.to_json()), "runtime": inspector.runtime, "quantize": inspector.quantize,
                "device": inspector.device, "thresholds": t.summary() if t else None,
                "heat_scale": {**asdict(inspector.heat_scale), "top": float(inspector.heat_scale.raw(ScoreScale.TOP))},
                "limits": asdict(limits)}

    @app.post("/predict")
    async def predict(request: Request, output: str = "json"):
        """An image (form field 'file', or a raw image body) -> JSON with score, label, thresholds and
        timing; `output=overlay|mask|heatmap` returns that PNG instead, with the facts in X-Cflow-* headers."""
        if output not in OUTPUTS:
            return _error(400, f"unknown output '{output}': choose one of {', '.join(OUTPUTS)}")
        if output == "mask" and inspector.thresholds is None:
            return _error(409, "this model has no thresholds, so no mask: run 'cflow-ad calibrate' first")
        got = await _upload(request)
        if isinstance(got, Response):
            return got
        if stats["waiting"] >= limits.max_queue + limits.max_concurrency:
            stats["rejected_busy"] += 1
            return _error(503, "server busy: too many requests waiting; retry shortly", {"Retry-After": "1"})
        stats["waiting"] += 1
        try:
            async with slots:
                result, png = await run_in_threadpool(infer, *got, output)
        except CflowInputError as exc:
            status = 413 if isinstance(exc, ImageTooLargeError) else 415 if isinstance(exc, ImageFormatError) else 400
            return _error(status, str(exc))
        finally:
            stats["waiting"] -= 1
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

    return BodyLimit(app, int(limits.max_upload_mb * 1e6))


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000, runtime: str = "onnx",
          limits: Limits | None = None, target_fpr: float | None = None, image_threshold: float | None = None,
          pixel_threshold: float | None = None, device: str = "auto", precision: str = "fp32",
          min_defect_area: int = 0, threads: int | None = None, quantize: str | None = None,
          all_regions: bool = False) -> None:
    """Load the model once on `device` and serve it until interrupted (uploads are decoded in the
    request threads, so no loader workers). An .onnx file is served without PyTorch."""
    import uvicorn

    limits = limits or Limits()
    # Parallel requests with fewer threads each beat one at a time with all of them: 35 vs 23 req/s
    # on 2 cores (benchmarks/serve_load.py); more threads than cores in total collapses throughput.
    share = max(1, (threads or available_cores()) // limits.max_concurrency)
    thresholds = (target_fpr, image_threshold, pixel_threshold)
    if is_onnx_file(model):
        if precision != "fp32":
            raise CflowInputError(f"--precision {precision} applies to --runtime torch: onnxruntime runs the"
                                  " exported fp32 model")
        inspector = Inspector(model, "onnx", *thresholds, None, min_defect_area, share, device, quantize, all_regions)
    else:
        from .checkpoint import read_metadata
        from .config import CFlowConfig
        from .device import Compute, set_threads
        from .model import METHOD_CLASSES

        if runtime == "onnx" and "onnx" not in METHOD_CLASSES[
                CFlowConfig.from_dict(read_metadata(model)["config"]).method].runtimes:
            runtime = "torch"  # the method has no ONNX form (SPADE's gallery search)
        share = set_threads(share)
        inspector = Inspector(model, runtime, *thresholds, Compute(device, precision, workers=0), min_defect_area,
                              share, quantize=quantize, all_regions=all_regions)
    print(f"cflow-ad: serving {model} ({inspector.config.method}, {inspector.runtime} on {inspector.device},"
          f" {limits.max_concurrency} x {share} threads) on http://{host}:{port}", flush=True)
    uvicorn.run(create_app(inspector, limits), host=host, port=port, log_level="warning")
