"""`detkit serve` as a user runs it: the real server in a subprocess on a free port, real HTTP.

One server per module (the tiny random ResNet-18 of tests/conftest.py) answers good, batched,
bad and overload requests; the last test sends it SIGTERM with requests in flight. Its settings make
batching and the queue observable without timing guesses: a batch waits up to MAX_WAIT_MS for more
images and holds up to 16, so the first MAX_QUEUE concurrent requests are all admitted and wait
together, and any request beyond them must be refused while they wait. Nothing sleeps a fixed
time: every wait polls a condition with a deadline.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import shapes_frame

pytestmark = pytest.mark.slow  # every test here talks to a server process (~5 s to start on 2 cores)

ROOT = Path(__file__).resolve().parents[2]
MAX_QUEUE = 8
MAX_WAIT_MS = 1500
MAX_BYTES = 200_000
MAX_PIXELS = 1_000_000
SCORE_THRESH = 0.05  # the tiny model's own threshold: every detection it makes is compared
STARTUP_S = 120.0  # bound on import + load + warm-up on a busy 2-core machine


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@dataclass
class Server:
    proc: subprocess.Popen
    host: str = "127.0.0.1"
    port: int = 0
    lines: list[str] = field(default_factory=list)

    def log(self) -> str:
        return "\n".join(self.lines[-40:])


def start_server(*args: str) -> Server:
    """`python -m detkit serve ARGS --port 0`; returns once it printed its port (not yet ready)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "detkit", "serve", *args, "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env=env(),
    )
    server = Server(proc)
    lines: queue.Queue = queue.Queue()

    def pump():  # keeps the pipe drained for the whole life of the process
        assert proc.stdout is not None
        for line in proc.stdout:
            server.lines.append(line.rstrip())
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        match = re.match(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if match:
            server.port = int(match.group(1))
            return server
    proc.kill()
    raise AssertionError(f"the server did not print its port:\n{server.log()}")


def request(
    server: Server, method: str, path: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 60
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def wait_ready(server: Server) -> dict:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        assert server.proc.poll() is None, f"the server exited with {server.proc.returncode}:\n{server.log()}"
        status, _, body = request(server, "GET", "/readyz")
        if status == 200:
            return json.loads(body)
        assert status == 503 and json.loads(body)["status"] == "loading"
        time.sleep(0.05)  # poll interval, not a wait for a fixed time
    raise AssertionError(f"/readyz did not turn 200 within {STARTUP_S} s:\n{server.log()}")


def detect(server: Server, data: bytes, query: str = "", content_type: str = "image/jpeg"):
    status, headers, body = request(
        server, "POST", f"/v1/detect{query}", body=data, headers={"Content-Type": content_type}
    )
    return status, headers, json.loads(body)


def multipart(fields: dict[str, tuple[str, str, bytes] | str]) -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data form; a tuple value is (filename, type, bytes)."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        if isinstance(value, tuple):
            filename, ctype, data = value
            head = f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\nContent-Type: {ctype}'
        else:
            head, data = f'Content-Disposition: form-data; name="{name}"', value.encode()
        parts.append(f"--{boundary}\r\n{head}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def in_threads(fn, items) -> list:
    """fn(item) for every item, each in its own thread started at once; results in order."""
    results: list = [None] * len(items)

    def run(i, item):
        try:
            results[i] = fn(item)
        except Exception as exc:  # noqa: BLE001 - handed to the test, which asserts on it
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, item)) for i, item in enumerate(items)]
    for thread in threads:
        thread.start()
    return threads, results


def wait_until(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)  # poll interval
    raise AssertionError(f"{what} within {timeout_s} s")


def queue_depth(server: Server) -> float:
    return metric(request(server, "GET", "/metrics")[2].decode(), "detkit_queue_depth")


# Three images of one size (as JPEG, PNG and WebP) and three of other sizes: the tiny model
# resizes the short side to 64 px (the long one to at most 96) and pads to multiples of 32.
IMAGES = {
    "same_a.jpg": shapes_frame(1, 96, 64),
    "same_b.png": shapes_frame(2, 96, 64),
    "same_c.webp": shapes_frame(3, 96, 64),
    "square.png": shapes_frame(4, 64, 64),
    "tall.jpg": shapes_frame(5, 64, 112),
    "large.jpg": shapes_frame(6, 160, 120),
}
CONTENT_TYPES = {".jpg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("serve_images")
    for name, bgr in IMAGES.items():
        assert cv2.imwrite(str(folder / name), bgr)
    return folder


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    srv = start_server(
        "--weights",
        str(tiny_checkpoint),
        "--device",
        "cpu",
        "--max-batch",
        "16",
        "--max-wait-ms",
        str(MAX_WAIT_MS),
        "--max-queue",
        str(MAX_QUEUE),
        "--threads",
        "1",
        "--score-thresh",
        str(SCORE_THRESH),
        "--max-bytes",
        str(MAX_BYTES),
        "--max-pixels",
        str(MAX_PIXELS),
    )
    try:
        wait_ready(srv)
        yield srv
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait(30)


@pytest.fixture(scope="module")
def infer_batch_1(tiny_checkpoint, image_dir, tmp_path_factory) -> dict[str, list[dict]]:
    """file name -> its detections from `tools/infer.py --batch-size 1` (predictions.json)."""
    out = tmp_path_factory.mktemp("infer_out") / "out"
    proc = subprocess.run(
        [sys.executable, "tools/infer.py", "--weights", str(tiny_checkpoint), "--input", str(image_dir)]
        + ["--output", str(out), "--batch-size", "1", "--score-thresh", str(SCORE_THRESH), "--device", "cpu"]
        + ["--workers", "0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    by_file: dict[str, list[dict]] = {name: [] for name in IMAGES}
    for pred in json.loads((out / "predictions.json").read_text()):
        by_file[pred["file_name"]].append(pred)
    return by_file


def test_probes_and_openapi_page(server):
    assert request(server, "GET", "/healthz")[:2][0] == 200
    ready = wait_ready(server)
    assert ready["classes"] == ["circle", "square", "triangle"]
    assert ready["model_score_thresh"] == pytest.approx(0.05) and ready["max_queue"] == MAX_QUEUE
    schema = json.loads(request(server, "GET", "/openapi.json")[2])
    detect_op = schema["paths"]["/v1/detect"]["post"]
    assert set(detect_op["requestBody"]["content"]) == {
        "image/jpeg",
        "image/png",
        "image/webp",
        "application/octet-stream",
        "multipart/form-data",
    }
    assert [p["name"] for p in detect_op["parameters"]] == ["score_thresh"]
    status, headers, page = request(server, "GET", "/docs")
    assert status == 200 and headers["content-type"].startswith("text/html") and b"openapi.json" in page


def test_concurrent_requests_batch_and_equal_infer_batch_size_1(server, image_dir, infer_batch_1):
    names = list(IMAGES)

    def send(name):
        data = (image_dir / name).read_bytes()
        return detect(server, data, f"?score_thresh={SCORE_THRESH}", CONTENT_TYPES[Path(name).suffix])

    threads, answers = in_threads(send, names)
    for thread in threads:
        thread.join(120)
    total = 0
    for name, answer in zip(names, answers):
        assert not isinstance(answer, Exception), answer
        status, _, result = answer
        assert status == 200, result
        h, w = IMAGES[name].shape[:2]
        assert (result["width"], result["height"]) == (w, h)
        assert result["model"] == "tiny_checkpoint" or result["model"]  # the checkpoint folder's name
        expected = infer_batch_1[name]
        assert len(result["scores"]) == len(expected) > 0, name
        total += len(expected)
        boxes = np.array(result["boxes"])
        want_xywh = np.array([p["bbox"] for p in expected])
        want = np.concatenate([want_xywh[:, :2], want_xywh[:, :2] + want_xywh[:, 2:]], axis=1)
        np.testing.assert_allclose(boxes, want, atol=1e-3, err_msg=name)  # xyxy in the image's own pixels
        np.testing.assert_allclose(result["scores"], [p["score"] for p in expected], atol=1e-5, err_msg=name)
        assert result["class_names"] == [p["category_name"] for p in expected]
        assert result["labels"] == [["circle", "square", "triangle"].index(n) for n in result["class_names"]]
        assert 0 <= result["time_ms"]["inference"] <= result["time_ms"]["total"]
    # All six arrived within one batch window and ran in one forward pass, mixed sizes included
    # (64 x 85, 64 x 64, 96 x 55 after resizing): the model is batch-invariant (test.batch_invariant),
    # so each still got its `infer --batch-size 1` detections, checked above.
    sizes = {name: answer[2]["batch_size"] for name, answer in zip(names, answers)}
    assert sizes == dict.fromkeys(names, 6)
    assert total > 6


def test_multipart_upload_and_score_thresh(server, image_dir):
    data = (image_dir / "same_a.jpg").read_bytes()
    status, _, raw = detect(server, data, f"?score_thresh={SCORE_THRESH}", "application/octet-stream")
    assert status == 200
    thresh = raw["scores"][len(raw["scores"]) // 2]  # keeps the better half
    body, ctype = multipart({"image": ("a.jpg", "image/jpeg", data), "score_thresh": repr(thresh)})
    status, _, form = detect(server, body, "", ctype)
    assert status == 200 and form["score_thresh"] == thresh
    # The same detections, only those scoring at least thresh (best first).
    keep = [i for i, s in enumerate(raw["scores"]) if s >= thresh]
    assert form["scores"] == [raw["scores"][i] for i in keep] and form["boxes"] == [raw["boxes"][i] for i in keep]
    assert 0 < len(keep) < len(raw["scores"])


def test_bad_requests_get_4xx_with_one_line_and_the_server_goes_on(server, image_dir):
    jpeg = (image_dir / "same_a.jpg").read_bytes()
    bmp = cv2.imencode(".bmp", IMAGES["square.png"])[1].tobytes()
    big = cv2.imencode(".png", np.zeros((1100, 1000, 3), np.uint8))[1].tobytes()  # 1.1 MP, a few kB
    assert len(big) < MAX_BYTES
    no_file, no_file_type = multipart({"score_thresh": "0.5"})
    cases = [
        ("not an image", b"this is not an image", "", "image/jpeg", 400, "not a readable JPEG, PNG or WebP"),
        ("truncated jpeg", jpeg[: len(jpeg) * 2 // 3], "", "image/jpeg", 400, "truncated"),
        ("empty body", b"", "", "image/jpeg", 400, "empty (0 bytes)"),
        ("too many pixels", big, "", "image/png", 413, "1000 x 1100 = 1100000 pixels, over this server's limit"),
        ("too many bytes", b"\xff\xd8" + bytes(MAX_BYTES), "", "image/jpeg", 413, "--max-bytes"),
        ("wrong content type", jpeg, "", "text/plain", 415, "Content-Type 'text/plain' is not an image"),
        ("json content type", jpeg, "", "application/json", 415, "is not an image"),
        ("other format", bmp, "", "image/bmp", 415, "is not an image"),
        ("bmp as octet-stream", bmp, "", "application/octet-stream", 415, "BMP images are not accepted"),
        ("score above 1", jpeg, "?score_thresh=1.5", "image/jpeg", 400, "score_thresh=1.5 is outside [0, 1]"),
        ("score below 0", jpeg, "?score_thresh=-0.1", "image/jpeg", 400, "outside [0, 1]"),
        ("score not a number", jpeg, "?score_thresh=high", "image/jpeg", 400, "is not a number"),
        ("score below the model's", jpeg, "?score_thresh=0.01", "image/jpeg", 400, "below the model's own threshold"),
        ("multipart without a file", no_file, "", no_file_type, 400, "field named 'image'"),
    ]
    for what, data, query, ctype, want_status, words in cases:
        status, _, answer = detect(server, data, query, ctype)
        assert status == want_status, (what, answer)
        assert set(answer) == {"error"} and words in answer["error"] and "\n" not in answer["error"], (what, answer)
    # A chunked upload has no Content-Length: the limit holds while the body is read.
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    chunks = [b"\xff\xd8" + bytes(MAX_BYTES // 4)] * 5
    conn.request("POST", "/v1/detect", body=iter(chunks), headers={"Content-Type": "image/jpeg"}, encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413 and "--max-bytes" in json.loads(response.read())["error"]
    conn.close()
    status, _, answer = detect(server, jpeg, f"?score_thresh={SCORE_THRESH}")
    assert status == 200 and answer["scores"]
    assert server.proc.poll() is None


def test_overload_is_refused_at_once_with_retry_after(server, image_dir):
    jpeg = (image_dir / "same_a.jpg").read_bytes()
    assert queue_depth(server) == 0
    threads, answers = in_threads(lambda _: detect(server, jpeg), range(MAX_QUEUE))
    # The admitted images wait together for the batch window (MAX_WAIT_MS): the queue is full.
    wait_until(lambda: queue_depth(server) == MAX_QUEUE, MAX_WAIT_MS / 1000, f"{MAX_QUEUE} images waiting")
    refused = []
    for _ in range(3):
        tic = time.perf_counter()
        refused.append((*detect(server, jpeg), time.perf_counter() - tic))
    still_waiting = queue_depth(server)
    for thread in threads:
        thread.join(120)
    for status, headers, answer, _ in refused:
        assert status == 503
        assert "busy" in answer["error"] and f"--max-queue {MAX_QUEUE}" in answer["error"]
        assert int(headers["retry-after"]) >= 1
    # "At once": answered while the admitted ones were still waiting for their forward pass.
    assert still_waiting == MAX_QUEUE
    assert all(not isinstance(a, Exception) and a[0] == 200 and a[2]["batch_size"] == MAX_QUEUE for a in answers)
    assert queue_depth(server) == 0


def test_metrics_count_requests_batches_latency_and_queue(server, image_dir):
    def scrape():
        status, headers, body = request(server, "GET", "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain")
        return body.decode()

    before = scrape()
    jpeg = (image_dir / "same_a.jpg").read_bytes()
    assert detect(server, jpeg)[0] == 200
    assert detect(server, jpeg, "", "text/plain")[0] == 415
    after = scrape()
    for name, delta in [
        ('detkit_requests_total{status="200"}', 1),
        ('detkit_requests_total{status="415"}', 1),
        ("detkit_batch_size_count", 1),
        ("detkit_batch_size_sum", 1),
        ("detkit_request_latency_seconds_count", 1),
        ("detkit_inference_seconds_count", 1),
    ]:
        assert metric(after, name) - metric(before, name) == delta, name
    # Every image answered 200 ran in exactly one forward pass (the warm-up pass is not counted).
    assert metric(after, "detkit_batch_size_sum") == metric(after, 'detkit_requests_total{status="200"}')
    assert metric(after, 'detkit_requests_total{status="503"}') >= 3
    assert metric(after, 'detkit_request_latency_seconds_bucket{le="+Inf"}') == metric(
        after, "detkit_request_latency_seconds_count"
    )
    assert "# TYPE detkit_queue_depth gauge" in after and metric(after, "detkit_queue_depth") == 0


def test_a_model_that_cannot_load_ends_the_command_with_status_2(tmp_path):
    bad = tmp_path / "model.pth"
    bad.write_bytes(b"not a checkpoint at all")
    srv = start_server("--weights", str(bad), "--device", "cpu")
    assert srv.proc.wait(STARTUP_S) == 2
    # run_cli's one error line (the reason may quote torch.load's own multi-line text after it).
    assert any(line.startswith(f"error: {bad} ") for line in srv.lines), srv.log()
    assert not any(line.startswith("Traceback") for line in srv.lines), srv.log()


def test_sigterm_drains_requests_in_flight_then_exits_0(server, image_dir):
    """Runs last: it stops the module's server."""
    jpeg = (image_dir / "same_b.png").read_bytes()
    threads, answers = in_threads(lambda _: detect(server, jpeg, "", "image/png"), range(3))
    wait_until(lambda: queue_depth(server) == 3, MAX_WAIT_MS / 1000, "3 images waiting")
    server.proc.send_signal(signal.SIGTERM)

    def refused():
        try:
            request(server, "GET", "/healthz", timeout=5)
        except ConnectionRefusedError:
            return True
        return False

    wait_until(refused, 30, "new connections refused after SIGTERM")
    for thread in threads:
        thread.join(120)
    assert server.proc.wait(60) == 0, server.log()
    # The three were waiting for their forward pass when SIGTERM came, and were answered.
    assert all(not isinstance(a, Exception) and a[0] == 200 and a[2]["scores"] for a in answers), answers
    assert any("draining" in line for line in server.lines), server.log()
