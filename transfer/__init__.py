"""transfer: fine-tune pretrained timm backbones on your images with Lightning and Hydra."""

__version__ = "0.1.0"
