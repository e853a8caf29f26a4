"""Predict image files with a trained checkpoint: ``python predict.py ckpt=PATH inputs=FOLDER|FILE|GLOB``."""

from transfer.cli.commands import predict

if __name__ == "__main__":
    predict()
