"""What runs the model behind the server: PyTorch, or ONNX Runtime on the exported graph.

Both take the preprocessed NCHW batch and give the task's decoded outputs (class probabilities,
tag probabilities, values), averaged over the test-time views as `Classifier.probabilities` does,
so the server answers the same whichever runs. On a CPU, ONNX Runtime runs the same EfficientNet
several times faster than eager PyTorch (benchmarks/README.md, "Serving"); its INT8 export
(``export.py quantize=int8``) faster again.

``backend=onnxruntime`` without a file exports the checkpoint's inference graph
(`transfer.inference.graph`) once into ``<paths.cache_dir>/onnx/<checkpoint digest>/`` and checks it
against PyTorch there; a later start with the same checkpoint reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from transfer.errors import TransferError
from transfer.inference.graph import OUTPUTS, InferenceGraph
from transfer.model.classifier import Classifier
from transfer.model.tta import average_views, tta_symmetries

log = logging.getLogger("transfer")
BACKENDS = ("auto", "torch", "onnxruntime")


class Runtime(Protocol):
    name: str

    def probabilities(self, images: torch.Tensor, tta: str = "none") -> torch.Tensor:
        """The task's decoded outputs for a preprocessed NCHW batch, averaged over the TTA views."""
        ...


class TorchRuntime:
    """The checkpoint's PyTorch model (`Classifier.probabilities`), channels-last on the CPU."""

    name = "torch"

    def __init__(self, classifier: Classifier, threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.classifier = classifier
        self.channels_last = classifier.device.type == "cpu"
        if self.channels_last:  # the faster layout for convolutions on CPUs (benchmarks/speed.py)
            classifier.model.to(memory_format=torch.channels_last)

    def probabilities(self, images: torch.Tensor, tta: str = "none") -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.classifier.probabilities(images, tta).cpu()


class OnnxRuntime:
    """An exported inference graph (fp32 or INT8) in an ONNX Runtime session."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, classifier: Classifier, threads: int | None = None) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle intra-op threads sleep instead of spinning: the server's other processes (HTTP,
        # image decoding) need those cores between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if classifier.device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        names = [output.name for output in self.session.get_outputs()]
        if "probabilities" not in names:
            raise TransferError(
                f"{path} has outputs {names}, not the inference graph's {list(OUTPUTS)}: export it again "
                "with this version (python export.py ckpt=...), or leave onnx= empty to export at start."
            )
        self.symmetries = classifier.symmetries
        self.path = Path(path)

    def decode(self, views: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(views.numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(["probabilities"], {"image": array})[0])

    def probabilities(self, images: torch.Tensor, tta: str = "none") -> torch.Tensor:
        return average_views(self.decode, images.cpu(), tta_symmetries(tta, self.symmetries))


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_onnx(classifier: Classifier, cache_dir: str | Path, tolerance: float = 1e-4) -> Path:
    """The checkpoint's inference graph as ONNX in the cache, exported and checked on first use.

    The check runs the graph in PyTorch and in ONNX Runtime on seeded noise at the input size (no
    data is at hand when a server starts; ``export.py`` checks on the run's real test images), and
    fails loudly rather than serve a graph that answers differently. ``classifier``'s model is put
    on the CPU in float32 for the export.
    """
    from transfer.inference.export import export_onnx, output_difference

    folder = Path(cache_dir).expanduser() / "onnx" / file_digest(classifier.checkpoint)[:24]
    path = folder / "model.onnx"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    height, width = classifier.input_config["size"]
    images = torch.from_numpy(np.random.default_rng(0).normal(size=(4, 3, height, width)).astype(np.float32))
    model = classifier.model.float().eval().to("cpu").to(memory_format=torch.contiguous_format)
    with torch.inference_mode():
        expected = dict(zip(OUTPUTS, (o.numpy() for o in InferenceGraph(model, classifier.task)(images)), strict=True))
    log.info("Exporting %s to ONNX for ONNX Runtime (once; kept in %s)", classifier.checkpoint, folder)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:  # another server may be exporting too
        staged = Path(scratch) / "model.onnx"
        outputs = export_onnx(model, classifier, images[:2], staged)(images.numpy())
        differences = {key: output_difference(value, expected[key], key) for key, value in outputs.items()}
        if max(differences.values()) > tolerance:
            raise TransferError(
                f"The ONNX export of {classifier.checkpoint} differs from PyTorch by {differences} "
                f"(tolerance {tolerance:g}); serve it with backend=torch."
            )
        (Path(scratch) / "parity.json").write_text(json.dumps({"checkpoint": classifier.checkpoint, **differences}))
        os.replace(Path(scratch) / "parity.json", folder / "parity.json")
        os.replace(staged, path)
    return path


def resolve_backend(backend: str, device: str) -> str:
    """``auto``: ONNX Runtime on a CPU where it is installed (the ``export`` extra), else PyTorch."""
    if backend not in BACKENDS:
        raise TransferError(f"backend={backend} is not one of {list(BACKENDS)}.")
    if backend != "auto":
        return backend
    if device != "cpu":
        return "torch"
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return "torch"
    return "onnxruntime"


def build_runtime(backend: str, classifier: Classifier, onnx_path: str | None, threads: int | None) -> Runtime:
    if backend == "onnxruntime":
        if onnx_path is None:
            raise TransferError("backend=onnxruntime needs an ONNX file (the server exports one at start).")
        return OnnxRuntime(onnx_path, classifier, threads)
    return TorchRuntime(classifier, threads)
