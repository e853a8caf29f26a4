"""What the server runs, from the config and the hardware: backend, batch size, threads, workers."""

from __future__ import annotations

import importlib.util

import pytest

from transfer.config.compose import compose
from transfer.errors import TransferError
from transfer.inference.runtimes import resolve_backend

pytest.importorskip("litserve")
from transfer.inference.serve import ServingPlan, available_cores, serving_plan


def plan_for(overrides: list[str], tmp_path) -> ServingPlan:
    return serving_plan(compose("serve", ["ckpt=unused.ckpt", *overrides], output_dir=tmp_path))


def test_auto_settings_follow_the_hardware(tmp_path) -> None:
    cpu = plan_for(["accelerator=cpu", "backend=torch"], tmp_path)
    assert cpu == ServingPlan(
        device="cpu",
        backend="torch",
        onnx=None,
        max_batch_size=8,
        workers_per_device=1,
        threads=available_cores(),
        batch_timeout=0.002,
        api_servers=1,
    )
    two_copies = plan_for(["accelerator=cpu", "backend=torch", "workers_per_device=2"], tmp_path)
    assert two_copies.threads == max(1, available_cores() // 2)  # no copy oversubscribes the cores
    gpu = plan_for(["accelerator=cuda"], tmp_path)  # composed only: nothing is loaded
    assert (gpu.backend, gpu.max_batch_size, gpu.threads, gpu.batch_timeout) == ("torch", 32, None, 0.01)


def test_explicit_settings_win(tmp_path) -> None:
    plan = plan_for(
        [
            "accelerator=cpu",
            "backend=onnxruntime",
            "onnx=somewhere/model.int8.onnx",
            "max_batch_size=1",
            "threads=1",
            "workers_per_device=2",
            "batch_timeout=0.05",
            "api_servers=2",
        ],
        tmp_path,
    )
    assert plan == ServingPlan("cpu", "onnxruntime", "somewhere/model.int8.onnx", 1, 2, 1, 0.05, 2)


def test_the_backend_auto_is_onnx_runtime_on_a_cpu_only() -> None:
    installed = importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnxscript")
    assert resolve_backend("auto", "cpu") == ("onnxruntime" if installed else "torch")
    assert resolve_backend("auto", "cuda") == "torch"
    assert resolve_backend("torch", "cpu") == "torch"
    with pytest.raises(TransferError, match="backend=tensorrt"):
        resolve_backend("tensorrt", "cpu")


def test_a_model_onnx_cannot_express_is_served_by_pytorch_under_auto(tmp_path, monkeypatch) -> None:
    pytest.importorskip("onnxruntime")
    import transfer.inference.serve as serve

    def failing_export(*args, **kwargs):
        raise RuntimeError("no ONNX function for aten.some_op")

    monkeypatch.setattr(serve, "load_classifier", lambda *args, **kwargs: None)
    monkeypatch.setattr(serve, "cached_onnx", failing_export)
    assert plan_for(["accelerator=cpu"], tmp_path).backend == "torch"
    with pytest.raises(RuntimeError, match="aten.some_op"):
        plan_for(["accelerator=cpu", "backend=onnxruntime"], tmp_path)
