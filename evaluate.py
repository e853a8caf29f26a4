"""Evaluate a trained checkpoint: ``python evaluate.py ckpt=PATH [data=...] [split=test]``."""

from transfer.cli.commands import evaluate

if __name__ == "__main__":
    evaluate()
