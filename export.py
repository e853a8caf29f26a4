"""Export a trained checkpoint to ONNX and TorchScript, parity-checked: ``python export.py ckpt=PATH``."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    from transfer.cli import run_command
    from transfer.export import export

    run_command(export, cfg)


if __name__ == "__main__":
    main()
