"""Saliency overlays for a trained checkpoint: ``python explain.py ckpt=PATH inputs=FOLDER|FILE|GLOB``."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="explain")
def main(cfg: DictConfig) -> None:
    from transfer.cli import run_command
    from transfer.explain import explain_files

    run_command(explain_files, cfg)


if __name__ == "__main__":
    main()
