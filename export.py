"""Export a trained checkpoint to ONNX and TorchScript, parity-checked: ``python export.py ckpt=PATH``."""

from transfer.cli.commands import export

if __name__ == "__main__":
    export()
