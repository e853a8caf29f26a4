"""The Hydra configs, importable as ``transfer.conf`` once installed (see pyproject.toml)."""
