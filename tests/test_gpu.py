"""The GPU path the configs offer, as lightning-hydra-template's test_train_fast_dev_run_gpu: skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.fixtures import compose_config, train_config, write_image_folder

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_fast_dev_run_on_gpu_with_bf16_channels_last_and_compile(tmp_path: Path) -> None:
    images = write_image_folder(tmp_path / "images", per_class=8)
    cfg = compose_config(
        [
            "debug=fast_dev_run",
            "trainer=gpu",
            "trainer.precision=bf16-mixed",
            "runtime.channels_last=true",
            "runtime.compile=true",
            "data=folder",
            f"data.root={images}",
            "backbone=timm",
            "backbone.name=test_efficientnet",
            "backbone.weights=none",
            "trainer.enable_progress_bar=false",
        ],
        output_dir=tmp_path / "run",
    )
    results = train_config(cfg)
    assert results["world_size"] == 1 and len(results["stages"]) == 2
    assert 0.0 <= results["test"]["acc"] <= 1.0
