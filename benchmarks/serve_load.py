"""Load on ``transfer-serve``: throughput and latency at 1, 8 and 32 concurrent clients, batching on and off.

    python benchmarks/serve_load.py --ckpt outputs/runs/<run>/checkpoints/<best>.ckpt
    python benchmarks/serve_load.py --ckpt ... --screenshot docs/serve_page.png   # also the page in Chromium

For each setting (``max_batch_size`` 8, "batching on", and 1, "off") the script starts
``serve.py`` on a free loopback port, then, per concurrency level, sends ``--requests`` POST
/predict requests of one image each (real images of the run's test split, base64 JSON) from that
many client threads, each sending its next request when the last one is answered. It prints a
markdown table: requests sent, answered (HTTP 200) and failed (anything else, or no answer),
throughput, and p50/p95/p99 latency. Nothing may be lost: answered + failed = sent, and a
failure is reported, never retried.
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
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


def post(url: str, body: bytes) -> tuple[int, float]:
    started = time.perf_counter()
    call = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(call, timeout=120) as answer:
            answer.read()
            status = answer.status
    except urllib.error.HTTPError as error:
        status = error.code
    except OSError:
        status = 0  # no answer at all
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
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            outcome = post(url + "/predict", bodies[index % len(bodies)])
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--requests", type=int, default=192, help="requests per concurrency level")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--workdir", type=Path, default=ROOT / "outputs" / "serve_load" / time.strftime("%Y-%m-%d_%H-%M-%S")
    )
    parser.add_argument("--screenshot", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="extra serve.py overrides (after --)")
    args = parser.parse_args()

    from omegaconf import OmegaConf

    from transfer.inference.evaluate import evaluation_images
    from transfer.model.classifier import load_classifier

    task = load_classifier(args.ckpt, "cpu").task
    table, indices, _ = evaluation_images(
        OmegaConf.create({"ckpt": args.ckpt, "data": None, "seed": None}), "test", task
    )
    images = [Path(table.paths[i]) for i in indices[:32]]
    bodies = [json.dumps({"image": base64.b64encode(p.read_bytes()).decode("ascii")}).encode() for p in images]

    rows = []
    for label, batch in (("on (max_batch_size 8)", 8), ("off (max_batch_size 1)", 1)):
        process, url = start_server(args.ckpt, batch, args.workdir / f"batch{batch}", args.overrides)
        try:
            load(url, bodies, 2, 8)  # warm-up
            for clients in args.clients:
                rows.append((label, clients, load(url, bodies, clients, args.requests)))
                print(f"batching {label}, {clients} clients: {rows[-1][2]}", file=sys.stderr, flush=True)
            if args.screenshot is not None and batch == 8:
                screenshot(url, images[0], args.screenshot)
        finally:
            stop_server_process(process)

    print(f"Checkpoint {args.ckpt}; one image per request ({len(images)} test images in turn)\n")
    print("| batching | clients | sent | answered | failed | req/s | p50 ms | p95 ms | p99 ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, clients, r in rows:
        print(
            f"| {label} | {clients} | {r['sent']} | {r['answered']} | {r['failed'] + r['lost']} | "
            f"{r['throughput']:.1f} | {r['p50']:.0f} | {r['p95']:.0f} | {r['p99']:.0f} |"
        )


if __name__ == "__main__":
    main()
