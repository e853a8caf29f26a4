"""Saliency overlays for a trained checkpoint: ``python explain.py ckpt=PATH inputs=FOLDER|FILE|GLOB``."""

from transfer.cli.commands import explain

if __name__ == "__main__":
    explain()
