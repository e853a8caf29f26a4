"""Data sources, splits, decoding, transforms and the datamodule."""
