"""Fine-tune a pretrained timm backbone: ``python train.py [group=option] [key=value ...]``.

This file only composes the Hydra config and hands it to `transfer.run.train`.
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

import transfer  # noqa: F401  (process settings and OmegaConf resolvers)
from transfer.errors import user_error_in


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from transfer.run import train

    try:
        results = train(cfg)
    except Exception as error:  # a user's mistake gets its one paragraph; a bug keeps its traceback
        user_error = user_error_in(error)
        if user_error is None:
            raise
        logging.getLogger("transfer").error("%s", user_error)
        sys.exit(1)
    return results["test"].get(cfg.monitor.metric.split("/")[-1])


if __name__ == "__main__":
    main()
