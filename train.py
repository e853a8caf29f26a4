"""Fine-tune a pretrained timm backbone: ``python train.py [group=option] [key=value ...]``.

This file only composes the Hydra config and hands it to `transfer.run.train`.
"""

from transfer.commands import train

if __name__ == "__main__":
    train()
