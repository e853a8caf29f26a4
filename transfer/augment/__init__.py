"""Training augmentation: the symmetries a pipeline applies, and ``augment=auto``'s probe that chooses
the transforms a dataset's labels survive."""
