"""``export.py``: ONNX and TorchScript files that predict correctly outside the toolkit.

Each export is checked on real images: ONNX Runtime and the TorchScript module must give the
same outputs as the PyTorch model (max abs difference under ``tolerance``), and
``preprocessing.json`` records the exact preprocessing, so code that has never seen this
toolkit can feed the model what it was trained on.

The ONNX model is the whole inference graph (`transfer.inference.graph`): outputs ``logits``,
``probabilities`` (the task's decoding) and ``features`` (the pooled features), each checked; the
server's ONNX Runtime backend runs that file. TorchScript and timm's format hold the timm model
(logits), as LibTorch and ``timm.create_model`` users expect.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from transfer.config.run_folder import resolve_checkpoint
from transfer.data.files import find_images
from transfer.data.images import load_rgb
from transfer.data.transforms import resize_target
from transfer.errors import TransferError
from transfer.inference.graph import OUTPUTS, InferenceGraph
from transfer.model.classifier import Classifier, load_classifier

log = logging.getLogger("transfer")
FORMATS = ("onnx", "torchscript", "timm")
Runner = Callable[[np.ndarray], dict[str, np.ndarray]]  # images -> the outputs an export gives, by name


def preprocessing_spec(classifier: Classifier) -> dict[str, Any]:
    """What `transfer.data.transforms.eval_transform` does, in words any runtime can follow."""
    config = classifier.input_config
    height, width = config["size"]
    return {
        "decode": "apply the EXIF orientation, convert to 8-bit RGB (alpha over white)",
        "resize_shorter_side_to": resize_target(config),
        "resize": "cv2.resize to (round(w * s), round(h * s)), s = resize_shorter_side_to / min(h, w); "
        "PIL's resize anti-aliases and gives slightly different pixels",
        "interpolation": config["interpolation"],
        "center_crop": [height, width],
        "crop_offsets": "top (h - crop_h) // 2, left (w - crop_w) // 2",
        "scale": "divide by 255",
        "mean": config["mean"],
        "std": config["std"],
        "layout": "NCHW float32, batch dimension dynamic",
        "input_name": "image",
        "onnx_outputs": list(OUTPUTS),
        "task": classifier.task.name,
        "task_state": classifier.task.state(),  # e.g. per-tag thresholds, regression targets' mean and std
        "output": classifier.task.describe_output(),
        "class_names": classifier.class_names,
        "backbone": classifier.backbone,
        "checkpoint": classifier.checkpoint,
    }


def export_onnx(model: torch.nn.Module, classifier: Classifier, example: torch.Tensor, path: Path) -> Runner:
    """The inference graph (logits, probabilities, features) as ONNX, batch dimension dynamic."""
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as error:
        raise TransferError(
            f"ONNX export needs the 'export' extra ({error.name} is missing): "
            "pip install -e '.[export]', or export formats=[torchscript] only."
        ) from error
    for name in ("onnxscript", "onnx_ir"):  # their graph-optimisation chatter is not the user's business
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.onnx.export(
        InferenceGraph(model, classifier.task).eval(),
        (example,),
        str(path),
        input_names=["image"],
        output_names=list(OUTPUTS),
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda images: dict(zip(OUTPUTS, session.run(list(OUTPUTS), {"image": images}), strict=True))


def export_torchscript(model: torch.nn.Module, classifier: Classifier, example: torch.Tensor, path: Path) -> Runner:
    with warnings.catch_warnings():  # deprecated in favour of torch.export, still what LibTorch loads
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.trace(model, example).save(str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")
    return lambda images: {"logits": loaded(torch.from_numpy(images)).detach().numpy()}


def export_timm(model: torch.nn.Module, classifier: Classifier, example: torch.Tensor, path: Path) -> Runner:
    """timm's own format (timm's ``save_for_hf``): ``model.safetensors`` and ``config.json`` with the
    architecture, model arguments, class names and preprocessing, so that
    ``timm.create_model("local-dir:PATH", pretrained=True)`` builds this classifier, and
    ``huggingface_hub.upload_folder`` (or ``timm.models.push_to_hf_hub``) publishes it."""
    import timm
    from timm.models import save_for_hf

    config = classifier.input_config
    data_config = {
        "input_size": (3, *config["size"]),
        "mean": tuple(config["mean"]),
        "std": tuple(config["std"]),
        "crop_pct": config["crop_pct"],
        "interpolation": config["interpolation"],
    }
    # safetensors stores contiguous tensors: a channels_last model is saved in the default layout.
    plain = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    save_for_hf(
        plain,
        str(path),
        model_config={"label_names": list(classifier.class_names)},
        safe_serialization=True,
        data_config=data_config,
    )
    loaded = timm.create_model(f"local-dir:{path}", pretrained=True).eval()
    return lambda images: {"logits": loaded(torch.from_numpy(images)).detach().numpy()}


EXPORTERS = {
    "onnx": (export_onnx, "model.onnx"),
    "torchscript": (export_torchscript, "model.torchscript.pt"),
    "timm": (export_timm, "timm"),
}


def output_difference(exported: np.ndarray, expected: np.ndarray, name: str) -> float:
    """The largest difference of one output: absolute for logits and probabilities; for the pooled
    features, relative to their largest magnitude (hundreds of values of any scale)."""
    difference = float(np.abs(exported - expected).max())
    return difference / max(1.0, float(np.abs(expected).max())) if name == "features" else difference


def parity_images(cfg: DictConfig, classifier: Classifier) -> tuple[torch.Tensor, list[str]]:
    """Real images for the parity check: ``inputs``, or else the training run's test split."""
    if cfg.get("inputs"):
        paths = [str(p) for p in find_images(str(cfg.inputs))]
    else:
        from transfer.inference.evaluate import evaluation_images

        table, indices, _ = evaluation_images(cfg, "test", classifier.task)
        paths = [table.paths[i] for i in indices]
    paths = paths[: cfg.parity_images]
    return torch.stack([classifier.preprocess(load_rgb(p)) for p in paths]), paths


def split_images(
    cfg: DictConfig,
    classifier: Classifier,
    split: str,
    count: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed images of the training run's ``split`` (at most ``count``, a seeded sample) and
    what the model should answer for them (class indices in its order, or tag targets)."""
    from transfer.inference.evaluate import answers_for, evaluation_images

    table, indices, _ = evaluation_images(cfg, split, classifier.task)
    if count is not None and len(indices) > count:
        indices = np.sort(np.random.default_rng(0).choice(indices, size=count, replace=False))
    images = np.stack([classifier.preprocess(load_rgb(table.paths[i])).numpy() for i in indices])
    return images, answers_for(classifier, table, indices)


def quantize_export(cfg: DictConfig, classifier: Classifier, out_dir: Path) -> dict[str, Any]:
    """``quantize=int8``: model.int8.onnx from model.onnx, calibrated on training images, compared
    with fp32 on the whole test split (`transfer.quantize`); written to quantization.json."""
    from transfer.inference.quantize import compare_on_images, quantize_onnx

    if "onnx" not in cfg.formats:
        raise TransferError("quantize=... quantizes the ONNX model: keep onnx in formats.")
    if classifier.task.kind == "values":
        raise TransferError(
            "quantize=... compares the INT8 model's decisions with the fp32 model's; "
            "task=regression has values, not decisions: export without quantize."
        )
    calibration = None
    if cfg.quantize == "int8":
        calibration, _ = split_images(cfg, classifier, "train", cfg.calibration_images)
    int8_path = out_dir / "model.int8.onnx"
    mode = quantize_onnx(out_dir / "model.onnx", int8_path, cfg.quantize, calibration)
    test_images, test_labels = split_images(cfg, classifier, "test")
    report = {
        "mode": mode,
        "calibration_images": 0 if calibration is None else len(calibration),
        **compare_on_images(
            out_dir / "model.onnx",
            int8_path,
            test_images,
            test_labels,
            decide=lambda logits: classifier.predicted(classifier.task.probabilities(torch.from_numpy(logits))).numpy(),
        ),
    }
    (out_dir / "quantization.json").write_text(json.dumps(report, indent=2))
    log.info(
        "INT8 (%s): %s, test accuracy %.4f vs fp32 %.4f (delta %+.4f, agreement %.4f), %.1f MB vs %.1f MB",
        mode,
        int8_path,
        report["int8_acc"],
        report["fp32_acc"],
        report["acc_delta"],
        report["agreement"],
        report["int8_bytes"] / 1e6,
        report["fp32_bytes"] / 1e6,
    )
    return report


def export(cfg: DictConfig) -> dict[str, Any]:
    resolve_checkpoint(cfg)  # ckpt= or run=
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(cfg.formats) - set(FORMATS))
    if unknown:
        raise TransferError(f"Unknown export format(s) {unknown}; choose from {list(FORMATS)}.")
    classifier = load_classifier(cfg.ckpt, "cpu")
    model = classifier.model.float().eval()
    images, paths = parity_images(cfg, classifier)
    with torch.inference_mode():
        expected = dict(zip(OUTPUTS, (o.numpy() for o in InferenceGraph(model, classifier.task)(images)), strict=True))
    report: dict[str, Any] = {
        "checkpoint": str(cfg.ckpt),
        "parity_images": paths,
        "tolerance": cfg.tolerance,
        "formats": {},
    }
    (out_dir / "preprocessing.json").write_text(json.dumps(preprocessing_spec(classifier), indent=2))
    for name in cfg.formats:
        exporter, filename = EXPORTERS[name]
        runner = exporter(model, classifier, images[:2], out_dir / filename)
        outputs = runner(images.numpy())
        differences = {key: output_difference(value, expected[key], key) for key, value in outputs.items()}
        difference = max(differences.values())
        report["formats"][name] = {
            "file": filename,
            "outputs": differences,
            "max_abs_diff": difference,
            "passed": difference <= cfg.tolerance,
        }
        log.info(
            "%s: %s, max |difference| of %s on %d real images = %.2e (tolerance %.0e)",
            name,
            out_dir / filename,
            ", ".join(outputs),
            len(paths),
            difference,
            cfg.tolerance,
        )
    if cfg.get("quantize"):
        report["quantization"] = quantize_export(cfg, classifier, out_dir)
    (out_dir / "parity.json").write_text(json.dumps(report, indent=2))
    failed = [name for name, result in report["formats"].items() if not result["passed"]]
    if failed:
        raise TransferError(
            f"The {failed} export(s) differ from the PyTorch model by more than "
            f"{cfg.tolerance:g} on real images (see {out_dir / 'parity.json'}); do not ship them."
        )
    log.info("Exported to %s (preprocessing.json describes the input)", out_dir)
    return report
