"""Predict image files with a trained checkpoint: ``python predict.py ckpt=PATH inputs=FOLDER|FILE|GLOB``."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    from transfer.cli import run_command
    from transfer.predict import predict

    run_command(predict, cfg)


if __name__ == "__main__":
    main()
