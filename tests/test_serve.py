"""`cflow-ad serve`: real HTTP calls against live servers on 127.0.0.1, and the web page in headless Chromium."""

from __future__ import annotations

import contextlib
import io
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from cflow_ad import api
from cflow_ad.checkpoint import load_checkpoint
from cflow_ad.cli import main

from .browser import chromium_page


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            time.sleep(0.3)
    raise AssertionError(f"server at {url} did not come up in {timeout} s")


@pytest.fixture(scope="module")
def server(padim_checkpoint):
    """`cflow-ad serve` as users start it, in its own process, with small limits to test against; one thread, so
    one inference at a time (not the default 2 x 1 threads)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "cflow_ad", "--threads", "1", "serve", "--model", str(padim_checkpoint),
           "--port", str(port), "--max-upload-mb", "0.2", "--max-pixels", "1000000", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _png(path: Path) -> bytes:
    return path.read_bytes()


def _sample(synthetic_root, kind: str) -> Path:
    return sorted((synthetic_root / "synthetic" / "test" / kind).glob("*.png"))[0]


def test_health_and_model_report_the_loaded_model(server, padim_checkpoint):
    health = requests.get(server + "/health", timeout=10).json()
    assert health["status"] == "ok"
    info = requests.get(server + "/model", timeout=10).json()
    stored = load_checkpoint(padim_checkpoint).thresholds
    assert info["config"]["method"] == "padim" and info["runtime"] == "onnx" and info["quantize"] == "none"
    assert info["device"] == "CPUExecutionProvider"  # onnxruntime-gpu is not installed here
    assert info["thresholds"]["image"] == pytest.approx(stored.image)
    assert info["thresholds"]["pixel"] == pytest.approx(stored.pixel)
    assert info["limits"]["max_pixels"] == 1_000_000
    assert info["limits"]["max_concurrency"] == 1  # --threads 1: one inference at a time, not 2 x 1 threads


def test_threads_are_shared_by_the_inferences_at_once_never_exceeded():
    from cflow_ad.serve import thread_plan

    assert thread_plan(1, 2) == (1, 1) and thread_plan(2, 2) == (2, 1) and thread_plan(8, 2) == (2, 4)
    assert thread_plan(3, 4) == (3, 1) and thread_plan(7, 1) == (1, 7)


def test_head_answers_like_get_and_there_are_no_api_pages(server):
    """Issue 33: HEAD got 405, which breaks HEAD health checks; /docs and /redoc loaded scripts from a CDN."""
    for path in ("/", "/health", "/model", "/legend.png"):
        get, head = requests.get(server + path, timeout=10), requests.head(server + path, timeout=10)
        assert head.status_code == get.status_code == 200 and head.content == b"", path
        assert head.headers["content-type"] == get.headers["content-type"], path
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        assert requests.get(server + path, timeout=10).status_code == 404, path


@pytest.mark.parametrize("flag, value", [
    ("--max-concurrency", "0"), ("--max-concurrency", "-1"), ("--max-upload-mb", "nan"), ("--max-upload-mb", "-1"),
    ("--max-queue", "-1"), ("--max-pixels", "0"), ("--max-output-side", "0"), ("--upload-timeout-s", "inf"),
    ("--max-connections", "0"), ("--port", "99999"), ("--port", "0"),
])
def test_invalid_serve_limits_are_one_line_before_anything_starts(flag, value, padim_checkpoint, capsys):
    """Issue 33: 0 concurrency raised ZeroDivisionError, nan a ValueError, port 99999 an OverflowError, and
    -1 MB, -1 queue or 0 pixels started a service that refused every request."""
    with pytest.raises(SystemExit) as exit:
        main(["serve", "--model", str(padim_checkpoint), flag, value])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert exit.value.code == 2 and len(lines) == 1 and f"{flag} {value}" in lines[0], err
    assert "serving" not in out


def test_a_port_in_use_is_one_line_before_the_model_loads(padim_checkpoint, capsys):
    """Issue 33: the service printed "serving on" and then exited 3."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exit:
            main(["serve", "--model", str(padim_checkpoint), "--port", str(port)])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert exit.value.code == 2 and len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "--port" in lines[0]
    assert "serving" not in out


def test_predict_returns_the_same_verdict_as_the_cli(server, padim_checkpoint, synthetic_root, tmp_path):
    files = [_sample(synthetic_root, "good"), _sample(synthetic_root, "spot"), _sample(synthetic_root, "scratch")]
    expected = api.predict(padim_checkpoint, files, tmp_path, progress=False)
    for f, want in zip(files, expected):
        r = requests.post(server + "/predict", files={"file": (f.name, _png(f), "image/png")}, timeout=60)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["file"] == f.name
        assert got["score"] == pytest.approx(want["score"], abs=1e-4)
        assert got["label"] == want["label"] and got["image_threshold"] == pytest.approx(want["image_threshold"])
        assert abs(got["defect_area_px"] - want["defect_area_px"]) <= 0.01 * got["width"] * got["height"]
        assert got["region_count"] == len(got["regions"]) and sum(g["area_px"] for g in got["regions"]) == got["defect_area_px"]
        assert set(got["timing"]) == {"decode_ms", "inference_ms", "total_ms"}
    assert [r["label"] for r in expected] == ["ok", "defect", "defect"]


def test_raw_body_and_png_outputs(server, synthetic_root):
    f = _sample(synthetic_root, "spot")
    raw = requests.post(server + "/predict", data=_png(f), headers={"Content-Type": "image/png"}, timeout=60)
    assert raw.status_code == 200 and raw.json()["label"] == "defect"
    size = Image.open(f).size
    for output in ("overlay", "mask", "heatmap"):
        r = requests.post(server + f"/predict?output={output}", files={"file": (f.name, _png(f), "image/png")}, timeout=60)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(r.content))
        assert image.size == size  # drawn at the upload's own size
        assert float(r.headers["X-Cflow-Score"]) == pytest.approx(raw.json()["score"], rel=1e-4)
        if output == "mask":
            assert int((np.asarray(image) > 0).sum()) == int(r.headers["X-Cflow-Defect-Area"]) > 0


def _status_and_error(r: requests.Response) -> tuple[int, str]:
    return r.status_code, r.json()["error"]


def test_bad_uploads_get_a_clear_4xx(server, synthetic_root, tmp_path):
    good = _png(_sample(synthetic_root, "good"))
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)).save(big, "PNG")
    huge_dims = io.BytesIO()
    Image.new("L", (1200, 1000)).save(huge_dims, "PNG")  # a small file of 1.2 megapixels
    post = lambda **kw: requests.post(server + "/predict", timeout=60, **kw)  # noqa: E731
    cases = {
        "oversize": (post(files={"file": ("big.png", big.getvalue(), "image/png")}), 413, "limit"),
        "oversize, chunked": (post(data=iter([big.getvalue()[:100_000], big.getvalue()[100_000:]]),
                                   headers={"Content-Type": "image/png"}), 413, "limit"),
        "too many pixels": (post(files={"file": ("wide.png", huge_dims.getvalue(), "image/png")}), 413, "megapixels"),
        "text body": (post(data=b"hello", headers={"Content-Type": "text/plain"}), 415, "not an image"),
        "text part": (post(files={"file": ("a.txt", b"hello", "text/plain")}), 415, "a.txt"),
        "not an image": (post(files={"file": ("x.png", b"\x89PNGnot really", "image/png")}), 400, "x.png"),
        "truncated": (post(files={"file": ("cut.png", good[: len(good) // 2], "image/png")}), 400, "cut.png"),
        "empty": (post(files={"file": ("e.png", b"", "image/png")}), 400, "empty"),
        "no file field": (post(files={"other": ("x.png", good, "image/png")}), 400, "'file'"),
        "bad output": (requests.post(server + "/predict?output=pdf", files={"file": ("g.png", good, "image/png")},
                                     timeout=60), 400, "pdf"),
    }
    for name, (response, status, needle) in cases.items():
        got_status, message = _status_and_error(response)
        assert got_status == status, (name, got_status, message)
        assert needle in message and "\n" not in message, (name, message)
    assert requests.get(server + "/health", timeout=10).json()["status"] == "ok"  # still serving


class _SlowRunner:
    """Wraps a model so each inference takes at least `seconds`: makes queueing deterministic."""

    def __init__(self, runner, seconds: float):
        self.runner, self.seconds = runner, seconds

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def __call__(self, images):
        time.sleep(self.seconds)
        return self.runner(images)


@contextlib.contextmanager
def _serving(inspector, limits):
    """`create_app` on a free port in a thread of this process (for what a test must reach inside: a slow
    model, tracemalloc), yielding its URL."""
    import uvicorn

    from cflow_ad.serve import create_app

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(inspector, limits), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def padim_inspector(padim_checkpoint):
    from cflow_ad.inference import Inspector

    return Inspector(padim_checkpoint, "torch")


def test_bounded_concurrency_answers_503_beyond_the_queue(padim_checkpoint, synthetic_root):
    from cflow_ad.inference import Inspector
    from cflow_ad.serve import Limits

    inspector = Inspector(padim_checkpoint, "torch")
    inspector.runner = _SlowRunner(inspector.runner, 0.5)
    with _serving(inspector, Limits(max_concurrency=1, max_queue=1)) as url:
        body = _png(_sample(synthetic_root, "good"))
        send = lambda _: requests.post(url + "/predict", data=body, headers={"Content-Type": "image/png"}, timeout=60)  # noqa: E731
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(send, range(6)))
        codes = sorted(r.status_code for r in responses)
        assert codes == [200, 200, 503, 503, 503, 503], codes  # one running, one waiting, the rest turned away
        busy = [r for r in responses if r.status_code == 503]
        assert all(r.headers["Retry-After"] == "1" and "busy" in r.json()["error"] for r in busy)
        health = requests.get(url + "/health", timeout=10).json()
        assert health["requests"] == 2 and health["rejected_busy"] == 4 and health["waiting"] == 0


def _stalled_upload(url: str, size: int = 200_000) -> socket.socket:
    """A connection that sent the headers of a raw upload of `size` bytes and all of it but the last byte."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\nContent-Length: {size}\r\n\r\n"
    sock.sendall(head.encode() + bytes(size - 1))
    return sock


def _answer(sock: socket.socket) -> int:
    """The status of the answer on `sock`, read to the end: the server must close the connection after it (with
    a reset where it left the rest of the body unread)."""
    data = b""
    with contextlib.suppress(ConnectionResetError), sock:
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


def _health_until(url: str, **want) -> dict:
    """/health once it reports `want` (the server takes the uploads' bytes in its own time)."""
    for _ in range(300):
        health = requests.get(url + "/health", timeout=10).json()
        if all(health[k] == v for k, v in want.items()):
            return health
        time.sleep(0.1)
    raise AssertionError(f"/health never reported {want}: {health}")


def test_uploads_still_arriving_are_counted_in_the_queue_and_time_out(padim_inspector):
    """Issue 33: the whole body was buffered before the queue was checked, with no timeout: 40 stalled uploads
    held 750 MB while /health said none were waiting, and were still open after 70 s."""
    from cflow_ad.serve import Limits

    with _serving(padim_inspector, Limits(max_concurrency=1, max_queue=1, upload_timeout_s=2)) as url:
        first = _stalled_upload(url)
        _health_until(url, waiting=1, uploading=1)
        second = _stalled_upload(url)
        _health_until(url, waiting=2, uploading=2)
        assert _answer(_stalled_upload(url)) == 503  # the queue is full of uploads
        assert _answer(first) == _answer(second) == 408  # and closed
        health = _health_until(url, waiting=0, uploading=0)
        assert health["rejected_busy"] == 1
        r = requests.post(url + "/predict", data=_png_of(np.zeros((64, 64, 3), np.uint8)),
                          headers={"Content-Type": "image/png"}, timeout=60)
        assert r.status_code == 200, r.text  # and serving as before


def _png_of(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def test_a_large_upload_is_drawn_at_a_bounded_size_with_regions_in_its_own_pixels(padim_inspector, synthetic_root):
    """Issue 33: a 6000 x 6000 PNG of 35 KB took 1.55 GB, the image and its map held at full size in float32.
    Now it is decoded shrunk to --max-output-side and drawn there; its regions are scaled back to its pixels."""
    from cflow_ad.serve import Limits

    small = np.asarray(Image.open(_sample(synthetic_root, "spot")).convert("RGB"))
    k = 12  # the same picture at 1536 x 1536, each pixel a k x k block
    big = _png_of(np.kron(small, np.ones((k, k, 1), dtype=np.uint8)))
    post = lambda url, data, output="json": requests.post(  # noqa: E731
        url + f"/predict?output={output}", files={"file": ("x.png", data, "image/png")}, timeout=60)
    with _serving(padim_inspector, Limits(max_output_side=2048)) as url:  # drawn at its own size, as before
        want = post(url, big).json()
        assert Image.open(io.BytesIO(post(url, big, "overlay").content)).size == (1536, 1536)
    with _serving(padim_inspector, Limits(max_output_side=256)) as url:
        got = post(url, big).json()
        for output in ("overlay", "heatmap", "mask"):
            r = post(url, big, output)
            assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (256, 256), output
    assert (got["width"], got["height"]) == (want["width"], want["height"]) == (1536, 1536)
    assert got["label"] == want["label"] == "defect" and got["score"] == pytest.approx(want["score"], rel=0.05)
    assert got["defect_area_px"] == sum(r["area_px"] for r in got["regions"])
    assert got["defect_area_px"] == pytest.approx(want["defect_area_px"], rel=0.05)
    a, b = got["regions"][0]["box"], want["regions"][0]["box"]
    for key in ("x", "y", "width", "height"):
        assert abs(a[key] - b[key]) <= k, (key, a, b)  # within 2 pixels of the 256-pixel drawing


def test_memory_of_a_request_does_not_grow_with_the_upload(padim_inspector):
    """The arrays of a 12-megapixel upload (numpy's are traced) stay far below one float32 copy of it (151 MB)."""
    from cflow_ad.serve import Limits

    ramp = np.linspace(0, 255, 4096, dtype=np.float32).astype(np.uint8)
    body = _png_of(np.repeat(np.broadcast_to(ramp[None, :, None], (3072, 4096, 1)), 3, axis=2))
    with _serving(padim_inspector, Limits(max_output_side=512)) as url:
        for output in ("json", "overlay"):
            tracemalloc.start()
            try:
                r = requests.post(url + f"/predict?output={output}", data=body,
                                  headers={"Content-Type": "image/png"}, timeout=60)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert r.status_code == 200, r.text
            assert peak < 40e6, (output, peak)


def test_a_jpeg_is_decoded_shrunk_and_turned_as_its_exif_says(tmp_path):
    from cflow_ad.images import read_scaled

    rgb = np.zeros((3000, 4000, 3), np.uint8)
    rgb[:1500] = 200  # the top half light: which way up the image came back shows
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    path = tmp_path / "photo.jpg"
    Image.fromarray(rgb).save(path, quality=90, exif=exif)
    x, original, stored = read_scaled(path, 64, max_side=500)
    assert stored == (4000, 3000) and original.shape == (3, 500, 375) and x.shape == (3, 64, 64)
    assert original[:, :, -10:].mean() > 0.7 and original[:, :, :10].mean() < 0.1  # the light half on the right
    plain = read_scaled(path, 64)[1]
    assert plain.shape == (3, 4000, 3000)  # without max_side: the image's own size, as predict reads it


def test_sixteen_bit_images_are_brought_to_8_bit_exactly():
    from cflow_ad.images import _to_8bit

    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    got = np.asarray(_to_8bit(Image.fromarray(values), Path("x.png"), "image"))
    assert got.dtype == np.uint8 and np.array_equal(got, np.round(values / 257.0))


def test_a_gif_is_refused_by_its_content_as_by_its_type(server, synthetic_root):
    """Issue 33: image/gif got 415, the same GIF sent as application/octet-stream was scored."""
    buf = io.BytesIO()
    Image.open(_sample(synthetic_root, "good")).save(buf, "GIF")
    for ctype in ("image/gif", "application/octet-stream", "image/png"):
        r = requests.post(server + "/predict", files={"file": ("a.gif", buf.getvalue(), ctype)}, timeout=60)
        assert r.status_code == 415 and "a.gif" in r.json()["error"], (ctype, r.text)


def test_web_page_uploads_an_image_and_shows_verdict_and_overlay(server, synthetic_root, tmp_path):
    f = _sample(synthetic_root, "spot")
    with chromium_page() as page:
        page.goto(server + "/")
        page.wait_for_function("document.getElementById('model').textContent.includes('padim')")
        page.set_input_files("#file", str(f))
        page.click("#submit")
        page.wait_for_selector("#result:not([hidden])", timeout=60_000)
        assert page.inner_text("#verdict") == "DEFECT"
        assert "score" in page.inner_text("#facts") and "defect area" in page.inner_text("#facts")
        assert " regions" in page.inner_text("#facts") and "(threshold 1)" in page.inner_text("#facts")
        regions = int(page.inner_text("#facts").split(" in ")[1].split(" regions")[0])
        assert regions >= 1 and page.locator("#regions li.region").count() == min(regions, 20)
        page.wait_for_function("document.getElementById('legend').naturalHeight == 256")  # the colour bar
        page.wait_for_function("document.getElementById('overlay').naturalWidth > 0")
        assert page.evaluate("document.getElementById('overlay').naturalWidth") == Image.open(f).size[0]
        # a bad upload shows the service's message instead of a result
        bad = tmp_path / "not_an_image.png"
        bad.write_bytes(b"plain text, not a PNG")
        page.set_input_files("#file", str(bad))
        page.click("#submit")
        page.wait_for_selector("#error:not([hidden])", timeout=60_000)
        assert "400" in page.inner_text("#error") and "not_an_image.png" in page.inner_text("#error")
        assert page.is_hidden("#result")
