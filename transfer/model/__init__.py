"""The model: a timm backbone and its weights, the freezing schedule's stages and blocks, the optimizer
and LR schedule of a stage, test-time views, the LightningModule, and a trained classifier rebuilt
from its checkpoint."""
