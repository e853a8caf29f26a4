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
server keeps serving: the wrong content type (415), a body over ``max_body_mb`` (413), not JSON,
missing or invalid fields, invalid base64, zero bytes, an undecodable or truncated image (400), or
one with more than ``max_image_pixels`` pixels (a decompression bomb; 413).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
import torch
from omegaconf import DictConfig

from transfer.errors import ImageReadError, TransferError

log = logging.getLogger("transfer")
PAGE = Path(__file__).with_name("static") / "index.html"
MAX_IMAGES_PER_REQUEST = 64


def bad_request(status: int, message: str) -> Exception:
    from fastapi import HTTPException

    return HTTPException(status_code=status, detail=message)


def decode_image(encoded: Any, name: str, max_pixels: int) -> np.ndarray:
    """A base64 string (optionally a data: URL, as browsers' FileReader gives) to 8-bit RGB."""
    from PIL import Image

    from transfer.data.images import rgb_from_bytes

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
        raise bad_request(413, f"{name}: {width}x{height} pixels is more than this server accepts "
                               f"({max_pixels:,}); send a smaller image.")
    try:
        return rgb_from_bytes(data, name)
    except ImageReadError as error:
        raise bad_request(400, f"{name}: the image cannot be decoded (truncated or corrupt): "
                               f"{error.__cause__ or error}") from None


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


class PredictAPI(ls.LitAPI):
    """``POST /predict``: several images per request; concurrent requests share one forward pass."""

    def __init__(self, ckpt: str, tta: str, max_image_pixels: int, **litapi: Any) -> None:
        super().__init__(api_path="/predict", **litapi)
        self.ckpt, self.tta, self.max_image_pixels = ckpt, tta, max_image_pixels

    def setup(self, device: str) -> None:
        from transfer.inference import load_classifier

        self.classifier = load_classifier(self.ckpt, device)

    def decode_request(self, request):  # noqa: ANN001 (LitServe passes the parsed JSON)
        images = images_in(request, single=False)
        return torch.stack([self.classifier.preprocess(decode_image(image, f"images[{i}]", self.max_image_pixels))
                            for i, image in enumerate(images)])

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


class ExplainAPI(ls.LitAPI):
    """``POST /explain``: one image's prediction plus its Grad-CAM overlay (the gradient map for
    models without convolutions), what the page shows. Unbatched: it needs a backward pass."""

    def __init__(self, ckpt: str, tta: str, max_image_pixels: int, **litapi: Any) -> None:
        super().__init__(api_path="/explain", **litapi)
        self.ckpt, self.tta, self.max_image_pixels = ckpt, tta, max_image_pixels

    def setup(self, device: str) -> None:
        from transfer.inference import load_classifier

        self.classifier = load_classifier(self.ckpt, device)

    def decode_request(self, request):  # noqa: ANN001
        return decode_image(images_in(request, single=True)[0], "image", self.max_image_pixels)

    def predict(self, rgb: np.ndarray) -> dict[str, Any]:
        from transfer.explain import model_view
        from transfer.saliency import explain, overlay

        image = self.classifier.preprocess(rgb).to(self.classifier.device)
        with torch.inference_mode():
            probabilities = self.classifier.probabilities(image.unsqueeze(0), self.tta).cpu()
        try:
            saliency, _ = explain(self.classifier.model, image, "gradcam", task=self.classifier.task)
            method = "gradcam"
        except TransferError:  # not a CNN
            saliency, _ = explain(self.classifier.model, image, "gradient", task=self.classifier.task)
            method = "gradient"
        picture = overlay(model_view(image, self.classifier.input_config), saliency)
        return {"prediction": describe(self.classifier, probabilities)[0], "method": method,
                "overlay_png": png_base64(picture)}

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return output


def make_apis(ckpt: str, tta: str = "none", max_batch_size: int = 8, batch_timeout: float = 0.01,
              max_image_pixels: int = 50_000_000) -> list[ls.LitAPI]:
    return [PredictAPI(ckpt, tta, max_image_pixels, max_batch_size=max_batch_size, batch_timeout=batch_timeout),
            ExplainAPI(ckpt, tta, max_image_pixels, max_batch_size=1)]


class CheckedRequests:
    """ASGI middleware: every POST to an API path is checked before LitServe queues it.

    LitServe batches concurrent requests and fails a whole batch when decoding one of them raises,
    so bad input must never reach the workers: here each request is read (at most ``max_bytes``),
    parsed and its images fully decoded (in a thread, off the event loop), and anything wrong is
    answered with its 4xx at once. The workers decode again what passed (a few ms an image).
    """

    def __init__(self, app: Any, paths: dict[str, bool], max_bytes: int, max_pixels: int) -> None:
        self.app, self.paths, self.max_bytes, self.max_pixels = app, paths, max_bytes, max_pixels

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
                message = await receive()
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_bytes:
                    raise bad_request(413, f"The request is larger than {self.max_bytes / 1e6:.0f} MB.")
            try:
                payload = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise bad_request(400, f"The body is not valid JSON: {error}.") from None
            single = self.paths[scope["path"]]
            images = images_in(payload, single)
            for index, image in enumerate(images):
                await run_in_threadpool(decode_image, image, "image" if single else f"images[{index}]",
                                        self.max_pixels)
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
    from transfer.inference import read_checkpoint

    state = read_checkpoint(ckpt)["transfer"]
    return {"checkpoint": str(ckpt), "backbone": state["backbone"], "classes": state["class_names"],
            "input": state["input_config"]}


def build_server(cfg: DictConfig) -> Any:
    """The LitServer with the page added to its FastAPI app."""
    from fastapi.responses import HTMLResponse

    apis = make_apis(str(cfg.ckpt), cfg.tta, cfg.max_batch_size, cfg.batch_timeout, cfg.max_image_pixels)
    max_bytes = int(cfg.max_body_mb * 1024 * 1024)
    checked = (CheckedRequests, {"paths": {"/predict": False, "/explain": True}, "max_bytes": max_bytes,
                                 "max_pixels": cfg.max_image_pixels})
    server = ls.LitServer(apis, accelerator=cfg.accelerator, devices=cfg.devices,
                          workers_per_device=cfg.workers_per_device, timeout=cfg.timeout,
                          max_payload_size=max_bytes, model_metadata=model_info(str(cfg.ckpt)),
                          middlewares=[checked])
    page = PAGE.read_text()
    # LitServe answers "/" with "litserve running": the page takes its place.
    server.app.router.routes = [r for r in server.app.router.routes if getattr(r, "path", None) != "/"]
    server.app.add_api_route("/", lambda: HTMLResponse(page), methods=["GET"], include_in_schema=False)
    return server


def serve(cfg: DictConfig) -> None:
    if not Path(cfg.ckpt).expanduser().is_file():
        raise TransferError(f"Checkpoint '{cfg.ckpt}' does not exist; pass ckpt=PATH to a .ckpt file.")
    server = build_server(cfg)
    log.info("Serving %s on http://%s:%d/ (API: POST /predict, POST /explain; GET /info, /health)",
             cfg.ckpt, cfg.host, cfg.port)
    server.run(host=cfg.host, port=cfg.port, generate_client_file=False)


def stop_server_process(process: Any) -> None:
    """Stop a ``serve.py`` started with ``start_new_session=True`` and its LitServe worker processes:
    Ctrl-C to the whole group (a clean shutdown), then SIGKILL for anything left. ``terminate()``
    on the main process alone leaves the workers running."""
    import os
    import signal
    import subprocess

    try:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=20)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=20)
