"""Composing the Hydra configs outside a command (the Python API, tests), and the config names that
changed (old ones keep working for one release)."""
