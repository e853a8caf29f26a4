"""Load on ``transfer-serve``: throughput and latency at 1, 8 and 32 concurrent clients, batching on and off.

    python benchmarks/serve_load.py --ckpt outputs/runs/<run>/checkpoints/<best>.ckpt
    python benchmarks/serve_load.py --ckpt ... --screenshot docs/serve_page.png   # also the page in Chromium

For each runtime (PyTorch, ONNX Runtime on the checkpoint's fp32 export, and an INT8 export given
with ``--int8``) and each setting (``max_batch_size`` 8, "batching on", and 1, "off") the script
starts ``serve.py`` on a free loopback port, then, per concurrency level, sends ``--requests`` POST
/predict requests of one image each (real images of the run's test split, base64 JSON) from that
many client threads, each on its own kept-alive connection, each sending its next request when the
last one is answered. First it measures each runtime's in-memory forward limit (preprocessed images,
no HTTP). It prints markdown tables: the limits; then requests sent, answered (HTTP 200) and failed
(anything else, or no answer), throughput and its share of the limit, and p50/p95/p99 latency.
Nothing may be lost: answered + failed = sent, and a failure is reported, never retried. The
clients run on the same machine as the server and share its CPU.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from transfer.inference.serve import stop_server_process

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Client:
    """One client: a kept-alive HTTP connection (as browsers and ``requests.Session`` keep them),
    reopened after an error."""

    def __init__(self, url: str) -> None:
        self.address = urllib.parse.urlsplit(url)
        self.connection: http.client.HTTPConnection | None = None

    def post(self, path: str, body: bytes) -> tuple[int, float]:
        started = time.perf_counter()
        try:
            if self.connection is None:
                self.connection = http.client.HTTPConnection(self.address.hostname, self.address.port, timeout=120)
            self.connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            answer = self.connection.getresponse()
            answer.read()
            status = answer.status
        except (OSError, http.client.HTTPException):
            status = 0  # no answer at all
            if self.connection is not None:
                self.connection.close()
            self.connection = None
        return status, time.perf_counter() - started


def start_server(ckpt: str, max_batch_size: int, workdir: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "serve.py"),
            f"ckpt={ckpt}",
            f"port={port}",
            f"max_batch_size={max_batch_size}",
            f"hydra.run.dir={workdir}",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as answer:
                if answer.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.5)
        if process.poll() is not None:
            break
    stop_server_process(process)
    sys.exit(f"serve.py did not come up (max_batch_size={max_batch_size}).")


def load(url: str, bodies: list[bytes], clients: int, requests: int) -> dict[str, float]:
    """``requests`` requests from ``clients`` closed-loop clients; every request is accounted for."""
    results: list[tuple[int, float]] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        connection = Client(url)
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            outcome = connection.post("/predict", bodies[index % len(bodies)])
            with lock:
                results.append(outcome)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        for _ in range(clients):
            pool.submit(client)
    seconds = time.perf_counter() - started
    latencies = np.array([latency for status, latency in results if status == 200]) * 1000
    answered = int(sum(status == 200 for status, _ in results))
    return {
        "sent": requests,
        "answered": answered,
        "failed": len(results) - answered,
        "lost": requests - len(results),
        "throughput": answered / seconds,
        **{f"p{q}": float(np.percentile(latencies, q)) if len(latencies) else float("nan") for q in (50, 95, 99)},
    }


def screenshot(url: str, image: Path, path: Path) -> None:
    """The page in headless Chromium after uploading ``image``."""
    import shutil

    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 900, "height": 560})
        page.goto(url + "/")
        page.set_input_files("#file", str(image))
        page.wait_for_selector('#label[data-state="done"]', timeout=120_000)
        page.screenshot(path=str(path), full_page=True)
        browser.close()


def forward_limits(ckpt: str, backend: str, onnx: str | None, images: list[Path]) -> dict[int, float]:
    """Images/s of the server's runtime on preprocessed images in memory (no HTTP, no decoding), in
    this process with the server's thread setting, at batch sizes 1, 8 and 32: the limit the server
    is compared with."""
    import torch

    from transfer.inference.runtimes import build_runtime
    from transfer.inference.serve import available_cores
    from transfer.model.classifier import load_classifier

    classifier = load_classifier(ckpt, "cpu")
    runtime = build_runtime(backend, classifier, onnx, available_cores())
    from transfer.data.images import load_rgb

    batch = torch.stack([classifier.preprocess(load_rgb(str(p))) for p in (images * 32)[:32]])
    limits = {}
    with torch.inference_mode():
        for size in (1, 8, 32):
            runtime.probabilities(batch[:size])  # warm-up
            repeats = max(2, 64 // size)
            started = time.perf_counter()
            for _ in range(repeats):
                runtime.probabilities(batch[:size])
            limits[size] = size * repeats / (time.perf_counter() - started)
    return limits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--requests", type=int, default=192, help="requests per concurrency level")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--workdir", type=Path, default=ROOT / "outputs" / "serve_load" / time.strftime("%Y-%m-%d_%H-%M-%S")
    )
    parser.add_argument("--screenshot", type=Path, default=None)
    parser.add_argument(
        "--batching", type=int, nargs="+", default=[8, 1], help="max_batch_size settings (1: batching off)"
    )
    parser.add_argument("--backends", nargs="+", default=["torch", "onnxruntime"], choices=["torch", "onnxruntime"])
    parser.add_argument("--int8", default=None, help="an INT8 export (model.int8.onnx) to serve with ONNX Runtime too")
    parser.add_argument(
        "--images", type=Path, default=None, help="a folder of images to send (default: the run's test split)"
    )
    parser.add_argument("overrides", nargs="*", help="extra serve.py overrides (after --)")
    args = parser.parse_args()

    from omegaconf import OmegaConf

    from transfer.config.compose import compose
    from transfer.inference.evaluate import evaluation_images
    from transfer.inference.runtimes import cached_onnx
    from transfer.model.classifier import load_classifier

    if args.images is not None:
        images = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})[:32]
    else:
        task = load_classifier(args.ckpt, "cpu").task
        table, indices, _ = evaluation_images(
            OmegaConf.create({"ckpt": args.ckpt, "data": None, "seed": None}), "test", task
        )
        images = [Path(table.paths[i]) for i in indices[:32]]
    bodies = [json.dumps({"image": base64.b64encode(p.read_bytes()).decode("ascii")}).encode() for p in images]

    runtimes: list[tuple[str, str, str | None]] = []  # (label, backend, ONNX file)
    for backend in args.backends:
        onnx = None
        if backend == "onnxruntime":  # the file serve.py would export and cache, made here once
            cache_dir = compose("serve", [f"ckpt={args.ckpt}"], output_dir=args.workdir).paths.cache_dir
            onnx = str(cached_onnx(load_classifier(args.ckpt, "cpu"), cache_dir))
        runtimes.append(("PyTorch" if backend == "torch" else "ONNX Runtime fp32", backend, onnx))
    if args.int8:
        runtimes.append(("ONNX Runtime INT8", "onnxruntime", args.int8))

    limits = {label: forward_limits(args.ckpt, backend, onnx, images) for label, backend, onnx in runtimes}
    rows = []
    for label, backend, onnx in runtimes:
        for batch in args.batching:
            batching = f"on ({batch})" if batch > 1 else "off"
            overrides = [f"backend={backend}", *([f"onnx={onnx}"] if onnx else []), *args.overrides]
            workdir = args.workdir / f"{backend}{'-int8' if onnx == args.int8 else ''}-batch{batch}"
            process, url = start_server(args.ckpt, batch, workdir, overrides)
            try:
                load(url, bodies, 2, 8)  # warm-up
                for clients in args.clients:
                    rows.append((label, batching, clients, load(url, bodies, clients, args.requests)))
                    print(
                        f"{label}, batching {batching}, {clients} clients: {rows[-1][3]}", file=sys.stderr, flush=True
                    )
                if args.screenshot is not None and batch > 1 and backend == "torch":
                    screenshot(url, images[0], args.screenshot)
            finally:
                stop_server_process(process)

    print(f"Checkpoint {args.ckpt}; one image per request ({len(images)} images in turn)\n")
    print("In-memory forward limit (preprocessed images, no HTTP), images/s:\n")
    print("| runtime | batch 1 | batch 8 | batch 32 |")
    print("| --- | ---: | ---: | ---: |")
    for label, limit in limits.items():
        print(f"| {label} | {limit[1]:.1f} | {limit[8]:.1f} | {limit[32]:.1f} |")
    print("\nServed (`of limit`: requests/s over the runtime's best in-memory images/s):\n")
    print("| runtime | batching | clients | sent | answered | failed | req/s | of limit | p50 ms | p95 ms | p99 ms |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, batching, clients, r in rows:
        share = r["throughput"] / max(limits[label].values())
        print(
            f"| {label} | {batching} | {clients} | {r['sent']} | {r['answered']} | {r['failed'] + r['lost']} | "
            f"{r['throughput']:.1f} | {share:.0%} | {r['p50']:.0f} | {r['p95']:.0f} | {r['p99']:.0f} |"
        )


if __name__ == "__main__":
    main()
