"""Fine-tune a pretrained timm backbone: ``python train.py [group=option] [key=value ...]``.

This file only composes the Hydra config and hands it to `transfer.run.train`.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from transfer.cli import run_command
    from transfer.run import train

    results = run_command(train, cfg)
    return results["test"].get(cfg.monitor.metric.split("/")[-1])  # the value Hydra sweepers optimise


if __name__ == "__main__":
    main()
