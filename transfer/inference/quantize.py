"""INT8 ONNX models for CPUs, with ONNX Runtime's quantization tools, checked on the run's test split.

Static quantization (the default, ``quantize=int8``) fixes the activation ranges from calibration
images, the run's own training images, so convolutions run as integer kernels with no range
computed at inference: the usual CPU speed-up for CNNs. Dynamic quantization
(``quantize=int8-dynamic``) quantizes weights only and measures activation ranges per batch: it
needs no calibration and is the usual choice for transformer MatMuls; static quantization falls
back to it (with a warning) where ONNX Runtime cannot quantize a graph statically. Both follow
ONNX Runtime's recipe: ``quant_pre_process`` (shape inference, graph optimisation), then QDQ
format, unsigned 8-bit activations, signed 8-bit per-channel weights. The task's decoding after the
logits (softmax, sigmoid) stays in float: probabilities keep their precision.

The INT8 model is then run next to the fp32 ONNX model on the test split: both accuracies, their
difference and how often the two agree are written to ``quantization.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from transfer.errors import TransferError
from transfer.progress import track

log = logging.getLogger("transfer")
MODES = ("int8", "int8-dynamic")


class CalibrationBatches:
    """ONNX Runtime's ``CalibrationDataReader`` protocol over preprocessed images, a batch at a time."""

    def __init__(self, images: np.ndarray, input_name: str, batch_size: int = 8) -> None:
        batches = np.array_split(images, max(1, -(-len(images) // batch_size)))
        self.batches: Iterator[np.ndarray] = iter(track(batches, "INT8 calibration"))
        self.input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}


def decoding_nodes(path: Path, logits: str = "logits") -> list[str]:
    """The nodes computed from the logits (the task's decoding into probabilities, `InferenceGraph`):
    they stay in float, so probabilities are not rounded to 8-bit steps."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found: dict[str, None] = {}
    tensors = [logits]
    while tensors:
        for node in consumers.get(tensors.pop(), []):
            if node.name not in found:
                found[node.name] = None
                tensors.extend(node.output)
    return list(found)


def quantize_onnx(
    fp32_path: Path, int8_path: Path, mode: str, calibration: np.ndarray | None, input_name: str = "image"
) -> str:
    """Write the INT8 model; returns the mode used ("static" or "dynamic")."""
    if mode not in MODES:
        raise TransferError(f"quantize={mode} is not one of {list(MODES)} (or null).")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = int8_path.with_name(int8_path.stem + ".prepared.onnx")
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    try:
        if mode == "int8":
            if calibration is None or not len(calibration):
                raise TransferError("Static INT8 quantization needs calibration images.")
            try:
                quantize_static(
                    str(prepared),
                    str(int8_path),
                    CalibrationBatches(calibration, input_name),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    nodes_to_exclude=decoding_nodes(prepared),
                )
                return "static"
            except TransferError:
                raise
            except Exception as error:  # an op ONNX Runtime cannot quantize statically
                log.warning("Static INT8 quantization failed (%s); quantizing dynamically instead.", error)
        quantize_dynamic(
            str(prepared), str(int8_path), weight_type=QuantType.QInt8, nodes_to_exclude=decoding_nodes(prepared)
        )
        return "dynamic"
    finally:
        prepared.unlink(missing_ok=True)


def compare_on_images(
    fp32_path: Path,
    int8_path: Path,
    images: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    input_name: str = "image",
    batch_size: int = 32,
    decide: Callable[[np.ndarray], np.ndarray] = lambda logits: logits.argmax(-1),
) -> dict[str, Any]:
    """Accuracy of the fp32 and the INT8 model on the same images, their difference and agreement;
    ``decide`` turns the model's outputs into class indices (the run's task; argmax by default)."""
    import onnxruntime

    def predictions(path: Path) -> np.ndarray:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.concatenate(
            [
                decide(session.run(None, {input_name: images[i : i + batch_size]})[0])
                for i in range(0, len(images), batch_size)
            ]
        )

    truth = np.asarray(labels)
    fp32, int8 = predictions(fp32_path), predictions(int8_path)
    # Multi-label decisions (0/1 per tag) count per tag: the share of (image, tag) pairs right.
    fp32_acc, int8_acc = float((fp32 == truth).mean()), float((int8 == truth).mean())
    return {
        "images": len(truth),
        "fp32_acc": fp32_acc,
        "int8_acc": int8_acc,
        "acc_delta": int8_acc - fp32_acc,
        "agreement": float((fp32 == int8).mean()),
        "fp32_bytes": fp32_path.stat().st_size,
        "int8_bytes": int8_path.stat().st_size,
    }
