"""``transfer-serve``: the fine-tuned classifier as an HTTP service and a web page, on LitServe.

LitServe (Lightning's serving engine, FastAPI and uvicorn underneath) runs the model in worker
processes and batches concurrent requests (``max_batch_size`` within ``batch_timeout``). What runs
the model is a runtime (`transfer.inference.runtimes`): ONNX Runtime on the checkpoint's exported
inference graph on a CPU, PyTorch otherwise; `serving_plan` sets the ``auto`` settings from the
hardware. Two APIs:

* ``POST /predict`` ``{"images": ["<base64>", ...]}`` (or ``{"image": "<base64>"}``): class names
  and probabilities per image; requests are batched together.
* ``POST /explain`` ``{"image": "<base64>"}``: the same for one image plus its Grad-CAM overlay (a
  base64 PNG), what the page shows; one image at a time (it needs a backward pass).
* ``GET /`` the page (plain HTML and JavaScript, `transfer/static/index.html`), ``GET /info`` the
  model's classes and input, ``GET /health``.

Every image goes through the checkpoint's own preprocessing. Bad input is the client's error,
answered with a 4xx naming the problem (`CheckedRequests`, before anything is queued) while the
server keeps serving: the wrong content type (415), a body over ``max_body_mb`` (413, LitServe's
``max_payload_size``), not JSON, missing or invalid fields, invalid base64, zero bytes, an
undecodable or truncated image (400), or one with more than ``max_image_pixels`` pixels (a
decompression bomb; 413). Each image is decoded once, there: the request reaches the model's worker
as the resized and cropped pixels (`pixels_message`), which it normalises a batch at a time.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import albumentations as A
import litserve as ls
import numpy as np
import torch
from omegaconf import DictConfig

from transfer.config.run_folder import resolve_checkpoint
from transfer.data.images import rgb_from_bytes
from transfer.data.transforms import finishing, geometry
from transfer.errors import ImageReadError, TransferError
from transfer.inference.explain import model_view
from transfer.inference.runtimes import build_runtime, cached_onnx, resolve_backend
from transfer.inference.saliency import explain, overlay
from transfer.model.classifier import load_classifier, read_checkpoint

log = logging.getLogger("transfer")
PAGE = Path(__file__).with_name("static") / "index.html"
MAX_IMAGES_PER_REQUEST = 64


def bad_request(status: int, message: str) -> Exception:
    from fastapi import HTTPException

    return HTTPException(status_code=status, detail=message)


def decode_image(encoded: Any, name: str, max_pixels: int) -> np.ndarray:
    """A base64 string (optionally a data: URL, as browsers' FileReader gives) to 8-bit RGB."""
    from PIL import Image

    if not isinstance(encoded, str):
        raise bad_request(400, f"{name}: expected a base64 string, got {type(encoded).__name__}.")
    if encoded.startswith("data:"):
        encoded = encoded.partition(",")[2]
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(400, f"{name}: not valid base64.") from None
    if not data:
        raise bad_request(400, f"{name}: the image is empty (0 bytes).")
    try:
        with Image.open(io.BytesIO(data)) as probe:  # the header alone: refuse bombs before decoding
            width, height = probe.size
    except Exception as error:
        raise bad_request(400, f"{name}: not an image ({type(error).__name__}: {error}).") from None
    if width * height > max_pixels:
        raise bad_request(
            413,
            f"{name}: {width}x{height} pixels is more than this server accepts ({max_pixels:,}); send a smaller image.",
        )
    try:
        return rgb_from_bytes(data, name)
    except ImageReadError as error:
        raise bad_request(
            400, f"{name}: the image cannot be decoded (truncated or corrupt): {error.__cause__ or error}"
        ) from None


def images_in(request: Any, single: bool) -> list[Any]:
    if not isinstance(request, dict):
        raise bad_request(400, 'Send a JSON object: {"images": ["<base64>", ...]} or {"image": "<base64>"}.')
    if "image" in request:
        return [request["image"]]
    if single:
        raise bad_request(400, 'Send {"image": "<base64>"}.')
    images = request.get("images")
    if not isinstance(images, list) or not images:
        raise bad_request(400, 'Send {"images": ["<base64>", ...]} (a non-empty list) or {"image": "<base64>"}.')
    if len(images) > MAX_IMAGES_PER_REQUEST:
        raise bad_request(413, f"At most {MAX_IMAGES_PER_REQUEST} images per request, not {len(images)}.")
    return images


def describe(classifier: Any, probabilities: torch.Tensor) -> list[dict[str, Any]]:
    """Per image, the task's answer: label, confidence and class probabilities; tags and their
    probabilities and thresholds; values in the data's units (`Task.describe`)."""
    return [classifier.task.describe(row, classifier.class_names) for row in probabilities]


def pixels_message(rgb: np.ndarray) -> dict[str, Any]:
    """An image as the middleware hands it to a worker: its resized and cropped 8-bit pixels."""
    return {
        "pixels": base64.b64encode(np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()).decode("ascii"),
        "shape": list(rgb.shape),
    }


def pixels_of(message: Mapping[str, Any]) -> np.ndarray:
    """`pixels_message` read back."""
    return np.frombuffer(base64.b64decode(message["pixels"]), dtype=np.uint8).reshape(message["shape"])


@dataclass(frozen=True)
class ServingPlan:
    """What runs where, from the config and the hardware (`serving_plan`)."""

    device: str = "cpu"  # cpu | cuda | mps
    backend: str = "torch"  # torch | onnxruntime
    onnx: str | None = None  # the ONNX file ONNX Runtime runs
    max_batch_size: int = 1
    workers_per_device: int = 1
    threads: int | None = None  # intra-op threads per worker (None: the runtime's default)
    batch_timeout: float = 0.0  # seconds a batch waits to fill up
    api_servers: int = 1  # uvicorn processes that take the HTTP requests and decode the images


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def serving_plan(cfg: DictConfig) -> ServingPlan:
    """``auto`` settings from the hardware. On a CPU: ONNX Runtime where installed, one model copy
    whose intra-op threads use every core (with more copies, the cores shared out among them), and
    batches of up to 8 requests (a CPU's throughput hardly grows with the batch; batching saves the
    per-request round trips of the worker's queue). On a GPU: PyTorch, one copy per GPU, batches of
    up to 32 (a GPU's throughput grows with the batch)."""
    accelerator = str(cfg.accelerator)
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    asked = str(cfg.get("backend", "auto"))
    backend = resolve_backend(asked, accelerator)
    onnx = cfg.get("onnx")
    if backend == "onnxruntime" and not onnx:
        try:
            onnx = str(cached_onnx(load_classifier(str(cfg.ckpt), "cpu"), cfg.paths.cache_dir))
        except Exception as error:  # a model ONNX cannot express: auto serves it with PyTorch
            if asked != "auto":
                raise
            log.warning("Serving with PyTorch: the ONNX export failed (%s: %s).", type(error).__name__, error)
            backend = "torch"
    on_cpu = accelerator == "cpu"

    def setting(key: str, cpu: float | None, gpu: float | None) -> Any:
        value = cfg.get(key, "auto")
        return (cpu if on_cpu else gpu) if value in ("auto", None) else value

    workers = int(setting("workers_per_device", 1, 1))
    threads = setting("threads", max(1, available_cores() // workers), None)  # the copies share the cores
    return ServingPlan(
        device=accelerator,
        backend=backend,
        onnx=str(onnx) if onnx else None,
        max_batch_size=int(setting("max_batch_size", 8, 32)),
        workers_per_device=workers,
        threads=None if threads is None else int(threads),
        batch_timeout=float(setting("batch_timeout", 0.002, 0.01)),
        api_servers=int(setting("api_servers", 1, 1)),
    )


class ModelAPI(ls.LitAPI):
    """What both APIs share: the checkpoint's classifier in each worker, the runtime that answers
    (`transfer.inference.runtimes`), and the normalisation that turns the pixels `CheckedRequests`
    prepared into the model's input."""

    def __init__(self, ckpt: str, tta: str, plan: ServingPlan, api_path: str, **litapi: Any) -> None:
        super().__init__(api_path=api_path, **litapi)
        self.ckpt, self.tta, self.plan = ckpt, tta, plan

    def setup(self, device: str) -> None:
        self.classifier = load_classifier(self.ckpt, device)
        self.normalise = A.Compose(finishing(self.classifier.input_config))
        self.runtime = build_runtime(self.plan.backend, self.classifier, self.plan.onnx, self.plan.threads)

    def tensors(self, pixels: np.ndarray) -> torch.Tensor:
        """A batch of prepared pixels (N x H x W x 3, uint8) normalised into the model's input at once."""
        images: torch.Tensor = self.normalise(images=pixels)["images"]
        return images


class PredictAPI(ModelAPI):
    """``POST /predict``: several images per request; concurrent requests share one forward pass,
    their pixels normalised together."""

    def __init__(self, ckpt: str, tta: str, plan: ServingPlan = ServingPlan(), **litapi: Any) -> None:
        super().__init__(ckpt, tta, plan, "/predict", **litapi)

    def decode_request(self, request):
        return np.stack([pixels_of(message) for message in request["images"]])

    def batch(self, inputs: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
        return np.concatenate(inputs), [len(x) for x in inputs]

    def predict(self, x: Any) -> Any:
        """One forward pass; batched inputs come as (pixels, images per request) and go back split."""
        pixels, counts = x if isinstance(x, tuple) else (x, None)
        with torch.inference_mode():
            probabilities = self.runtime.probabilities(self.tensors(pixels), self.tta)
        return probabilities if counts is None else list(torch.split(probabilities, counts))

    def unbatch(self, output: list[torch.Tensor]) -> list[torch.Tensor]:
        return output

    def encode_response(self, output: torch.Tensor) -> dict[str, Any]:
        return {"predictions": describe(self.classifier, output)}


class ExplainAPI(ModelAPI):
    """``POST /explain``: one image's prediction plus its Grad-CAM overlay (the gradient map for
    models without convolutions), what the page shows. Unbatched, and always PyTorch: it needs a
    backward pass."""

    def __init__(self, ckpt: str, tta: str, plan: ServingPlan = ServingPlan(), **litapi: Any) -> None:
        super().__init__(ckpt, tta, replace(plan, backend="torch"), "/explain", **litapi)

    def decode_request(self, request):
        return self.tensors(pixels_of(request["image"])[None])[0]

    def predict(self, image: torch.Tensor) -> dict[str, Any]:
        image = image.to(self.classifier.device)
        with torch.inference_mode():
            probabilities = self.classifier.probabilities(image.unsqueeze(0), self.tta).cpu()
        try:
            saliency, _ = explain(self.classifier.model, image, "gradcam", task=self.classifier.task)
            method = "gradcam"
        except TransferError:  # not a CNN
            saliency, _ = explain(self.classifier.model, image, "gradient", task=self.classifier.task)
            method = "gradient"
        picture = overlay(model_view(image, self.classifier.input_config), saliency)
        return {
            "prediction": describe(self.classifier, probabilities)[0],
            "method": method,
            "overlay_png": png_base64(picture),
        }

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return output


def make_apis(ckpt: str, plan: ServingPlan, tta: str = "none") -> list[ls.LitAPI]:
    return [
        PredictAPI(ckpt, tta, plan, max_batch_size=plan.max_batch_size, batch_timeout=plan.batch_timeout),
        ExplainAPI(ckpt, tta, plan, max_batch_size=1),
    ]


class CheckedRequests:
    """ASGI middleware: every POST to an API path is checked before LitServe queues it.

    LitServe batches concurrent requests and fails a whole batch when decoding one of them raises,
    so bad input must never reach the workers: here each request is read (LitServe's own size check
    answers 413 past ``max_payload_size``), parsed and its images fully decoded (in a thread, off the
    event loop), and anything wrong is answered with its 4xx at once. What passes goes on as the
    pixels the model's preprocessing resized and cropped (`pixels_message`): nothing is decoded twice.
    """

    def __init__(self, app: Any, paths: dict[str, bool], max_pixels: int, input_config: Mapping[str, Any]) -> None:
        self.app, self.paths, self.max_pixels = app, paths, max_pixels
        self.resize = A.Compose(geometry(input_config))

    def prepared(self, encoded: Any, name: str) -> dict[str, Any]:
        """One image checked, decoded, resized and cropped (what a worker's model takes, unnormalised)."""
        return pixels_message(self.resize(image=decode_image(encoded, name, self.max_pixels))["image"])

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        from fastapi import HTTPException
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import JSONResponse

        body = b""
        try:
            headers = dict(scope["headers"])
            content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower().decode("latin-1")
            if content_type != "application/json":
                raise bad_request(415, f"Send JSON (Content-Type: application/json), not '{content_type or 'none'}'.")
            more = True
            while more:
                message = await receive()  # LitServe's MaxSizeMiddleware raises 413 past max_payload_size
                body += message.get("body", b"")
                more = message.get("more_body", False)
            try:
                payload = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise bad_request(400, f"The body is not valid JSON: {error}.") from None
            single = self.paths[scope["path"]]
            images = [
                await run_in_threadpool(self.prepared, image, "image" if single else f"images[{index}]")
                for index, image in enumerate(images_in(payload, single))
            ]
            body = json.dumps({"image": images[0]} if single else {"images": images}).encode()
        except HTTPException as error:
            await JSONResponse({"detail": error.detail}, status_code=error.status_code)(scope, receive, send)
            return
        delivered = False

        async def replay() -> dict:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def png_base64(picture: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    image = picture if picture.dtype == np.uint8 else (np.clip(picture, 0, 1) * 255).round().astype(np.uint8)
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def model_info(ckpt: str) -> dict[str, Any]:
    state = read_checkpoint(ckpt)["transfer"]
    return {
        "checkpoint": str(ckpt),
        "backbone": state["backbone"],
        "classes": state["class_names"],
        "input": state["input_config"],
    }


def build_server(cfg: DictConfig, plan: ServingPlan) -> Any:
    """The LitServer with the page added to its FastAPI app."""
    from fastapi.responses import HTMLResponse

    apis = make_apis(str(cfg.ckpt), plan, cfg.tta)
    info = {**model_info(str(cfg.ckpt)), "runtime": plan.backend, "onnx": plan.onnx}
    checked = (
        CheckedRequests,
        {
            "paths": {"/predict": False, "/explain": True},
            "max_pixels": cfg.max_image_pixels,
            "input_config": info["input"],
        },
    )
    server = ls.LitServer(
        apis,
        accelerator=plan.device,
        devices=cfg.devices,
        workers_per_device=plan.workers_per_device,
        timeout=cfg.timeout,
        max_payload_size=int(cfg.max_body_mb * 1024 * 1024),
        model_metadata=info,
        middlewares=[checked],
    )
    page = PAGE.read_text()
    # LitServe answers "/" with "litserve running": the page takes its place.
    server.app.router.routes = [r for r in server.app.router.routes if getattr(r, "path", None) != "/"]
    server.app.add_api_route("/", lambda: HTMLResponse(page), methods=["GET"], include_in_schema=False)
    return server


def serve(cfg: DictConfig) -> None:
    resolve_checkpoint(cfg)  # ckpt= or run=
    read_checkpoint(cfg.ckpt)  # a missing or foreign file fails here, not in a worker process
    plan = serving_plan(cfg)
    server = build_server(cfg, plan)
    log.info(
        "Serving %s on http://%s:%d/ (API: POST /predict, POST /explain; GET /info, /health): %s on %s, "
        "batches of up to %d, %d worker(s) per device, %s threads each",
        cfg.ckpt,
        cfg.host,
        cfg.port,
        f"ONNX Runtime ({plan.onnx})" if plan.backend == "onnxruntime" else "PyTorch",
        plan.device,
        plan.max_batch_size,
        plan.workers_per_device,
        plan.threads or "default",
    )
    server.run(host=cfg.host, port=cfg.port, num_api_servers=plan.api_servers, generate_client_file=False)


def stop_server_process(process: Any) -> None:
    """Stop a ``serve.py`` started with ``start_new_session=True`` and its LitServe worker processes:
    Ctrl-C to the whole group (a clean shutdown), then SIGKILL for anything left. ``terminate()``
    on the main process alone leaves the workers running."""
    import contextlib
    import os
    import signal
    import subprocess

    with contextlib.suppress(subprocess.TimeoutExpired, ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=20)
