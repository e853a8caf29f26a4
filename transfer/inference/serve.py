"""``transfer-serve``: the fine-tuned classifier as an HTTP service and a web page, on LitServe.

LitServe (Lightning's serving engine, FastAPI and uvicorn underneath) runs the model in worker
processes and batches concurrent requests (``max_batch_size`` within ``batch_timeout``). Two APIs:

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
as the resized and cropped pixels (`pixels_message`), which it only normalises.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
from collections.abc import Mapping
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


class ModelAPI(ls.LitAPI):
    """What both APIs share: the checkpoint's classifier in each worker, and the normalisation that
    turns the pixels `CheckedRequests` prepared into the model's input."""

    def __init__(self, ckpt: str, tta: str, api_path: str, **litapi: Any) -> None:
        super().__init__(api_path=api_path, **litapi)
        self.ckpt, self.tta = ckpt, tta

    def setup(self, device: str) -> None:
        self.classifier = load_classifier(self.ckpt, device)
        self.normalise = A.Compose(finishing(self.classifier.input_config))

    def tensor(self, message: Mapping[str, Any]) -> torch.Tensor:
        image: torch.Tensor = self.normalise(image=pixels_of(message))["image"]
        return image


class PredictAPI(ModelAPI):
    """``POST /predict``: several images per request; concurrent requests share one forward pass."""

    def __init__(self, ckpt: str, tta: str, **litapi: Any) -> None:
        super().__init__(ckpt, tta, "/predict", **litapi)

    def decode_request(self, request):
        return torch.stack([self.tensor(message) for message in request["images"]])

    def batch(self, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        return torch.cat(inputs), [len(x) for x in inputs]

    def predict(self, x: Any) -> Any:
        """One forward pass; batched inputs come as (images, images per request) and go back split."""
        images, counts = x if isinstance(x, tuple) else (x, None)
        with torch.inference_mode():
            probabilities = self.classifier.probabilities(images, self.tta).cpu()
        return probabilities if counts is None else list(torch.split(probabilities, counts))

    def unbatch(self, output: list[torch.Tensor]) -> list[torch.Tensor]:
        return output

    def encode_response(self, output: torch.Tensor) -> dict[str, Any]:
        return {"predictions": describe(self.classifier, output)}


class ExplainAPI(ModelAPI):
    """``POST /explain``: one image's prediction plus its Grad-CAM overlay (the gradient map for
    models without convolutions), what the page shows. Unbatched: it needs a backward pass."""

    def __init__(self, ckpt: str, tta: str, **litapi: Any) -> None:
        super().__init__(ckpt, tta, "/explain", **litapi)

    def decode_request(self, request):
        return self.tensor(request["image"])

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


def make_apis(ckpt: str, tta: str = "none", max_batch_size: int = 8, batch_timeout: float = 0.01) -> list[ls.LitAPI]:
    return [
        PredictAPI(ckpt, tta, max_batch_size=max_batch_size, batch_timeout=batch_timeout),
        ExplainAPI(ckpt, tta, max_batch_size=1),
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


def build_server(cfg: DictConfig) -> Any:
    """The LitServer with the page added to its FastAPI app."""
    from fastapi.responses import HTMLResponse

    apis = make_apis(str(cfg.ckpt), cfg.tta, cfg.max_batch_size, cfg.batch_timeout)
    info = model_info(str(cfg.ckpt))
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
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        workers_per_device=cfg.workers_per_device,
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
    server = build_server(cfg)
    log.info(
        "Serving %s on http://%s:%d/ (API: POST /predict, POST /explain; GET /info, /health)",
        cfg.ckpt,
        cfg.host,
        cfg.port,
    )
    server.run(host=cfg.host, port=cfg.port, generate_client_file=False)


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
