"""transfer-serve: the JSON API, bad input, batching under concurrency, the page in a real browser."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.fixtures import FAST, ROOT, train_run, write_image_folder
from transfer.model.classifier import load_classifier

pytestmark = pytest.mark.slow  # see pyproject.toml: not in the developer's loop

pytest.importorskip("litserve")
from transfer.inference.serve import stop_server_process  # noqa: E402  (imports LitServe)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(url: str, body: bytes | None = None, content_type: str = "application/json") -> tuple[int, bytes]:
    call = urllib.request.Request(url, data=body, headers={"Content-Type": content_type} if body is not None else {})
    try:
        with urllib.request.urlopen(call, timeout=60) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def encoded(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def start_server(ckpt: str, workdir: Path, overrides: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "serve.py"),
            f"ckpt={ckpt}",
            f"port={port}",
            f"hydra.run.dir={workdir}",
            *overrides,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300  # a loaded CI machine starts LitServe's workers slowly
    while time.time() < deadline:
        try:
            if request(url + "/health")[0] == 200:
                return process, url
        except OSError:
            pass
        if process.poll() is not None:
            output = process.stdout.read()[-3000:]
            stop_server_process(process)
            pytest.fail(output)
        time.sleep(0.5)
    stop_server_process(process)
    pytest.fail("the server did not come up in 300 s")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The default server (ONNX Runtime on a CPU: the checkpoint exported at start) with small limits."""
    tmp = tmp_path_factory.mktemp("serve")
    images = write_image_folder(tmp / "images", per_class=12)
    results = train_run([*FAST, "data=folder", f"data.root={images}", "augment=none"], tmp / "run")
    ckpt = results["best_checkpoint"]["path"]
    overrides = ["max_body_mb=1", "max_image_pixels=1000000", "max_batch_size=4", "batch_timeout=0.05"]
    process, url = start_server(ckpt, tmp / "serve", overrides)
    yield {"url": url, "ckpt": ckpt, "images": images, "tmp": tmp}
    stop_server_process(process)


def expected_probabilities(ckpt: str, paths: list[Path]) -> torch.Tensor:
    classifier = load_classifier(ckpt)
    batch = torch.stack([classifier.preprocess(np.asarray(Image.open(p).convert("RGB"))) for p in paths])
    return classifier.probabilities(batch)


def test_predict_answers_with_the_checkpoints_own_probabilities(server) -> None:
    paths = sorted((server["images"] / "cat").glob("*.png"))[:2] + sorted((server["images"] / "dog").glob("*.png"))[:1]
    status, body = request(server["url"] + "/predict", json.dumps({"images": [encoded(p) for p in paths]}).encode())
    assert status == 200, body
    predictions = json.loads(body)["predictions"]
    expected = expected_probabilities(server["ckpt"], paths)
    for answer, row in zip(predictions, expected):
        served = torch.tensor([answer["probabilities"][name] for name in ("cat", "dog")])
        torch.testing.assert_close(served, row, atol=1e-5, rtol=1e-4)
        assert answer["label"] == ("cat", "dog")[int(row.argmax())]


def test_info_health_and_the_page(server) -> None:
    info = json.loads(request(server["url"] + "/info")[1])
    assert info["model"]["classes"] == ["cat", "dog"] and info["model"]["backbone"] == "test_resnet"
    if importlib.util.find_spec("onnxruntime"):  # the default on a CPU where the export extra is installed
        assert info["model"]["runtime"] == "onnxruntime" and info["model"]["onnx"].endswith("model.onnx")
    assert request(server["url"] + "/health") == (200, b"ok")
    status, page = request(server["url"] + "/")
    assert status == 200 and b'id="file"' in page and b"/explain" in page


def png_bytes(size: tuple[int, int], mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


BAD_INPUTS = {
    "not an image": (
        json.dumps({"images": [base64.b64encode(b"just some text").decode()]}).encode(),
        "application/json",
        400,
    ),
    "zero bytes": (json.dumps({"images": [""]}).encode(), "application/json", 400),
    "truncated": (
        json.dumps({"images": [base64.b64encode(png_bytes((64, 64), "RGB")[:60]).decode()]}).encode(),
        "application/json",
        400,
    ),
    "invalid base64": (json.dumps({"images": ["@@@"]}).encode(), "application/json", 400),
    "decompression bomb": (
        json.dumps({"images": [base64.b64encode(png_bytes((3000, 3000))).decode()]}).encode(),
        "application/json",
        413,
    ),
    "oversized body": (json.dumps({"images": ["A" * (2 * 1024 * 1024)]}).encode(), "application/json", 413),
    "wrong content type": (b"images=1", "application/x-www-form-urlencoded", 415),
    "not json": (b"{oops", "application/json", 400),
    "no images field": (json.dumps({"pictures": []}).encode(), "application/json", 400),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_a_4xx_and_the_next_request_succeeds(server, case: str) -> None:
    body, content_type, expected = BAD_INPUTS[case]
    status, answer = request(server["url"] + "/predict", body, content_type)
    assert status == expected, (case, answer[:300])
    assert json.loads(answer)["detail"]
    good = sorted((server["images"] / "cat").glob("*.png"))[0]
    assert request(server["url"] + "/predict", json.dumps({"image": encoded(good)}).encode())[0] == 200


def test_concurrent_requests_are_batched_and_a_bad_one_spoils_none(server) -> None:
    good = [encoded(p) for p in sorted((server["images"] / "dog").glob("*.png"))[:6]]
    bodies = [json.dumps({"images": [image]}).encode() for image in good] + [
        json.dumps({"images": ["@@@"]}).encode()
    ] * 3
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        answers = list(pool.map(lambda body: request(server["url"] + "/predict", body), bodies * 2))
    statuses = [status for status, _ in answers]
    assert statuses == ([200] * 6 + [400] * 3) * 2


def test_explain_returns_the_prediction_and_a_grad_cam_overlay(server) -> None:
    path = sorted((server["images"] / "dog").glob("*.png"))[0]
    status, body = request(
        server["url"] + "/explain", json.dumps({"image": "data:image/png;base64," + encoded(path)}).encode()
    )
    assert status == 200, body
    answer = json.loads(body)
    assert answer["method"] == "gradcam"
    overlay = Image.open(io.BytesIO(base64.b64decode(answer["overlay_png"])))
    assert overlay.size == (32, 32)  # the model's view of the image
    expected = expected_probabilities(server["ckpt"], [path])[0]
    assert answer["prediction"]["probabilities"]["dog"] == pytest.approx(float(expected[1]), abs=1e-5)


def test_pytorch_and_the_int8_export_serve_the_same_answers(server) -> None:
    """backend=torch, and ONNX Runtime on ``export.py quantize=int8``'s file, each without batching:
    PyTorch gives the checkpoint's probabilities; INT8 valid ones, nearly the same."""
    pytest.importorskip("onnxruntime")
    from tests.fixtures import command_config
    from transfer.inference.export import export

    export_dir = server["tmp"] / "int8"
    export(command_config("export", export_dir, [f"ckpt={server['ckpt']}", "formats=[onnx]", "quantize=int8"]))
    paths = sorted((server["images"] / "cat").glob("*.png"))[:3] + sorted((server["images"] / "dog").glob("*.png"))[:3]
    body = json.dumps({"images": [encoded(p) for p in paths]}).encode()
    expected = expected_probabilities(server["ckpt"], paths)
    for name, overrides, tolerance in (
        ("torch", ["backend=torch", "max_batch_size=1"], 1e-5),
        ("int8", ["backend=onnxruntime", f"onnx={export_dir / 'model.int8.onnx'}", "max_batch_size=1"], 0.1),
    ):
        process, url = start_server(server["ckpt"], server["tmp"] / f"serve_{name}", overrides)
        try:
            status, answer = request(url + "/predict", body)
            info = json.loads(request(url + "/info")[1])["model"]
        finally:
            stop_server_process(process)
        assert status == 200, answer
        assert info["runtime"] == ("torch" if name == "torch" else "onnxruntime")
        served = torch.tensor(
            [[p["probabilities"][c] for c in ("cat", "dog")] for p in json.loads(answer)["predictions"]]
        )
        torch.testing.assert_close(served.sum(-1), torch.ones(len(paths)), atol=1e-5, rtol=0)
        torch.testing.assert_close(served, expected, atol=tolerance, rtol=0)


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_the_page_in_a_real_browser_shows_the_apis_answer(server) -> None:
    # CI (.ci/run) installs Chromium and sets TRANSFER_REQUIRE_BROWSER=1: there the test cannot skip.
    if chromium() is None and not os.environ.get("TRANSFER_REQUIRE_BROWSER"):
        pytest.skip("needs Chromium (apt-get install chromium; .ci/run installs it)")
    assert chromium() is not None, "TRANSFER_REQUIRE_BROWSER is set but no Chromium is installed"
    from playwright import sync_api as playwright

    path = sorted((server["images"] / "cat").glob("*.png"))[3]
    api = json.loads(request(server["url"] + "/predict", json.dumps({"image": encoded(path)}).encode())[1])
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 900, "height": 640})
        page.goto(server["url"] + "/")
        page.set_input_files("#file", str(path))
        page.wait_for_selector('#label[data-state="done"]', timeout=60_000)
        label = page.inner_text("#label")
        shown = page.inner_text("#probabilities")
        assert page.eval_on_selector("#overlay", "img => img.naturalWidth") > 0
        screenshot = server["tmp"] / "page.png"
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    assert label == api["predictions"][0]["label"]
    percent = f"{100 * api['predictions'][0]['probabilities'][label]:.1f}%"
    assert percent in shown
    assert Image.open(screenshot).size[0] == 900
