"""Evaluate a trained checkpoint: ``python evaluate.py ckpt=PATH [data=...] [split=test]``."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from transfer.cli import run_command
    from transfer.evaluate import evaluate

    run_command(evaluate, cfg)


if __name__ == "__main__":
    main()
