"""Load test of `detkit serve`: a real HTTP client against the real server on 127.0.0.1.

    python -m benchmarks.load_test --weights output/shapes_r18/model_final.pth \\
        [--clients 1 4 16] [--seconds 20] [--overload-seconds 20] [--output output/load_test.json]

For each mode (batching on: --max-batch 8 --max-wait-ms 10; off: --max-batch 1) it starts
`python -m detkit serve` on a free port, waits for /readyz, then for each client count runs a
closed loop (every client sends its next image as soon as it has the previous answer, on a
keep-alive connection) for --seconds or --requests, whichever ends first, and reports
throughput (answers 200 per second) and latency p50 / p95 / p99.

Then, batching on, the overload phase: requests arrive open-loop (each on its own connection, as
many independent clients would send them, whatever the server answers) at --overload-factor
times the best closed-loop throughput, for --overload-seconds. It reports the share of 503s, the
p99 latency of the accepted requests, the server's peak RSS (VmHWM), whether it crashed (exited,
answered 5xx other than 503, or dropped connections) and the wrong answers.

Images: the validation split of the model's config (configs/shapes_r18.yaml: 160 x 160 JPEGs),
generated on first use. An answer is wrong when its detections differ from `Predictor` with batch
size 1 on the same image (this process computes them first) by more than 1e-3 px or 1e-4 in a
score, or in count, labels or order. Everything is bounded: each phase stops after its seconds or
requests and the script stops by itself; the exit status is 1 when a crash or a wrong answer was
seen. The client runs on the same CPUs as the server: on 2 cores it takes part of them.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODES = {"on": ["--max-batch", "8", "--max-wait-ms", "10"], "off": ["--max-batch", "1", "--max-wait-ms", "0"]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.load_test",
        description="Throughput, latency and overload behaviour of detkit serve on 127.0.0.1.",
    )
    parser.add_argument("--weights", default="output/shapes_r18/model_final.pth", help="detkit checkpoint to serve")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="closed-loop client counts")
    parser.add_argument("--modes", nargs="+", choices=tuple(MODES), default=["on", "off"], help="batching on / off")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each closed-loop phase (20)")
    parser.add_argument("--requests", type=int, default=2000, help="most requests of one closed-loop phase (2000)")
    parser.add_argument("--overload-factor", type=float, default=4.0, help="overload rate / sustainable rate (4)")
    parser.add_argument("--overload-seconds", type=float, default=20.0, help="length of the overload phase (20)")
    parser.add_argument("--max-queue", type=int, default=32, help="the server's --max-queue (32)")
    parser.add_argument("--images", type=int, default=50, help="distinct images sent, in turn (50)")
    parser.add_argument("--threads", type=int, help="the server's --threads (default: its own)")
    parser.add_argument("--output", default="output/load_test.json", help="where the results go as JSON")
    return parser


# --------------------------------------------------------------------------------------------
# Images and expected answers
# --------------------------------------------------------------------------------------------


def load_images(weights: str, count: int) -> tuple[list[bytes], list[dict]]:
    """(JPEG bytes, expected answer) of the first `count` images of the model's test split."""
    from detkit.data.image_io import decode_image
    from detkit.data.synthetic import ensure_shapes_dataset, params_from_config
    from detkit.engine.predictor import Predictor

    predictor = Predictor(weights, device="cpu", batch_size=1, score_thresh=0.5)
    test = predictor.cfg.data.test[0]
    if test.type != "shapes":
        raise SystemExit(f"{weights}: its config's test set is {test.type}, this load test generates shapes images")
    _, image_root = ensure_shapes_dataset(params_from_config(test), root=ROOT / "datasets" / "shapes")
    files = sorted(Path(image_root).iterdir())[:count]
    images = [f.read_bytes() for f in files]
    expected = []
    for data in images:
        dets = predictor(decode_image(data, "RGB"))
        expected.append({"boxes": dets.boxes, "scores": dets.scores, "labels": dets.labels.tolist()})
    return images, expected


def is_right(answer: dict, want: dict) -> bool:
    if answer["labels"] != want["labels"]:
        return False
    if not answer["labels"]:
        return True
    return bool(
        np.abs(np.asarray(answer["boxes"]) - want["boxes"]).max() <= 1e-3
        and np.abs(np.asarray(answer["scores"]) - want["scores"]).max() <= 1e-4
    )


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: list[str] = field(default_factory=list)

    def peak_rss_mb(self) -> float:
        """VmHWM of the server process: its peak resident memory so far."""
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"^VmHWM:\s+(\d+) kB", text, re.M).group(1)) / 1024

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def start_server(weights: str, extra: Sequence[str]) -> Server:
    proc = subprocess.Popen(
        [sys.executable, "-m", "detkit", "serve", "--weights", weights, "--port", "0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    log: list[str] = []
    port: list[int] = []
    started = threading.Event()

    def pump():
        assert proc.stdout is not None
        for line in proc.stdout:
            log.append(line.rstrip())
            match = re.match(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if match:
                port.append(int(match.group(1)))
                started.set()
        started.set()

    threading.Thread(target=pump, daemon=True).start()
    if not started.wait(180) or not port:
        proc.kill()
        raise SystemExit("the server did not start:\n" + "\n".join(log[-20:]))
    server = Server(proc, port[0], log)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the server exited:\n" + "\n".join(log[-20:]))
        try:
            if get(server.port, "/readyz")[0] == 200:
                return server
        except OSError:
            pass
        time.sleep(0.1)  # readiness poll interval
    proc.kill()
    raise SystemExit("the server was not ready within 180 s")


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """Outcomes of one phase: latencies in seconds of answers 200, counts by status, errors."""

    latencies_s: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    connection_errors: int = 0
    wrong: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, status: int, seconds: float, right: bool) -> None:
        with self.lock:
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status == 200:
                self.latencies_s.append(seconds)
                self.wrong += not right

    def summary(self, wall_s: float) -> dict:
        lat = np.asarray(self.latencies_s) * 1000
        total = sum(self.statuses.values()) + self.connection_errors
        return {
            "requests": total,
            "ok": len(self.latencies_s),
            "throughput_per_s": round(len(self.latencies_s) / wall_s, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 1) if lat.size else None,
            "p95_ms": round(float(np.percentile(lat, 95)), 1) if lat.size else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 1) if lat.size else None,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "share_503": round(self.statuses.get(503, 0) / max(total, 1), 3),
            "connection_errors": self.connection_errors,
            "wrong_answers": self.wrong,
            "wall_s": round(wall_s, 2),
        }


def send(conn: http.client.HTTPConnection, data: bytes) -> tuple[int, dict | None]:
    conn.request("POST", "/v1/detect", body=data, headers={"Content-Type": "image/jpeg"})
    response = conn.getresponse()
    body = response.read()
    return response.status, json.loads(body) if response.status == 200 else None


def closed_loop(port: int, clients: int, images, expected, seconds: float, max_requests: int) -> dict:
    tally = Tally()
    counter = iter(range(max_requests))
    counter_lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(offset: int):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while time.perf_counter() < stop_at:
            with counter_lock:
                n = next(counter, None)
            if n is None:
                break
            k = (n + offset) % len(images)
            tic = time.perf_counter()
            try:
                status, answer = send(conn, images[k])
            except (OSError, http.client.HTTPException):
                with tally.lock:
                    tally.connection_errors += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                continue
            tally.add(status, time.perf_counter() - tic, status != 200 or is_right(answer, expected[k]))
        conn.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i * 7,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tally.summary(time.perf_counter() - start)


def open_loop(port: int, rate_per_s: float, seconds: float, images, expected) -> dict:
    """Requests arriving at a fixed rate, each on a new connection, whatever the answers."""
    tally = Tally()
    count = int(rate_per_s * seconds)

    def one(n: int):
        k = n % len(images)
        tic = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            status, answer = send(conn, images[k])
        except (OSError, http.client.HTTPException):
            with tally.lock:
                tally.connection_errors += 1
            return
        finally:
            conn.close()
        tally.add(status, time.perf_counter() - tic, status != 200 or is_right(answer, expected[k]))

    start = time.perf_counter()
    # Enough threads that arrivals never wait for a free one: the server, not the client, limits.
    with ThreadPoolExecutor(max_workers=256) as pool:
        for n in range(count):
            delay = start + n / rate_per_s - time.perf_counter()
            if delay > 0:
                time.sleep(delay)  # the arrival schedule
            pool.submit(one, n)
    return {"offered_per_s": round(rate_per_s, 2), **tally.summary(time.perf_counter() - start)}


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    if not Path(args.weights).is_file():
        raise SystemExit(f"--weights {args.weights}: no such file (train one: detkit train configs/shapes_r18.yaml)")
    images, expected = load_images(args.weights, args.images)
    common = ["--max-queue", str(args.max_queue)] + (["--threads", str(args.threads)] if args.threads else [])
    results: dict = {"weights": args.weights, "images": len(images), "closed_loop": [], "overload": None}
    best_rate = 0.0
    crashed = False
    for mode in args.modes:
        server = start_server(args.weights, MODES[mode] + common)
        try:
            for clients in args.clients:
                row = {"batching": mode, "clients": clients}
                row |= closed_loop(server.port, clients, images, expected, args.seconds, args.requests)
                results["closed_loop"].append(row)
                print(json.dumps(row), flush=True)
                if mode == "on":
                    best_rate = max(best_rate, row["throughput_per_s"])
            if mode == "on" and args.overload_seconds > 0 and best_rate > 0:
                row = open_loop(server.port, args.overload_factor * best_rate, args.overload_seconds, images, expected)
                row["peak_rss_mb"] = round(server.peak_rss_mb(), 1)
                row["server_alive"] = server.proc.poll() is None
                row["answers_5xx_not_503"] = sum(
                    n for status, n in row["statuses"].items() if int(status) >= 500 and int(status) != 503
                )
                results["overload"] = row
                print(json.dumps(row), flush=True)
                crashed |= not row["server_alive"] or row["answers_5xx_not_503"] > 0 or row["connection_errors"] > 0
            alive = server.proc.poll() is None
            results.setdefault("exit_status", {})[mode] = server.stop() if alive else server.proc.returncode
            crashed |= not alive or results["exit_status"][mode] != 0
        finally:
            if server.proc.poll() is None:
                server.proc.kill()
    wrong = sum(r["wrong_answers"] for r in results["closed_loop"]) + (results["overload"] or {}).get(
        "wrong_answers", 0
    )
    results["crashed"] = crashed
    results["wrong_answers"] = wrong
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(format_table(results))
    print(f"results: {out}")
    return 1 if crashed or wrong else 0


def format_table(results: dict) -> str:
    lines = [
        "| batching | clients | answers/s | p50 ms | p95 ms | p99 ms | wrong |",
        "| :--- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results["closed_loop"]:
        lines.append(
            f"| {r['batching']} | {r['clients']} | {r['throughput_per_s']:.1f} | {r['p50_ms']} | {r['p95_ms']} | "
            f"{r['p99_ms']} | {r['wrong_answers']} |"
        )
    o = results["overload"]
    if o:
        lines += [
            "",
            f"overload: {o['offered_per_s']:.1f} requests/s offered for {o['wall_s']:.0f} s: "
            f"{100 * o['share_503']:.1f} % answered 503, p99 of the accepted {o['p99_ms']} ms, "
            f"{o['throughput_per_s']:.1f} answers 200/s, peak RSS {o['peak_rss_mb']:.0f} MB, "
            f"server alive {o['server_alive']}, other 5xx {o['answers_5xx_not_503']}, "
            f"connection errors {o['connection_errors']}, wrong answers {o['wrong_answers']}",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
