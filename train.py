"""Fine-tune a pretrained timm backbone: ``python train.py [group=option] [key=value ...]``.

This file only composes the Hydra config and hands it to the Python API's job
(`transfer.api.fine_tune_config`; in Python: ``from transfer import fine_tune``).
"""

from transfer.cli.commands import train

if __name__ == "__main__":
    train()
