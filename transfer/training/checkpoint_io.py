"""Checkpoints written atomically: a crash or a kill while saving never leaves a half file.

Lightning writes local checkpoints through an fsspec transaction whose temporary file lives in
the system temp directory; when that is another filesystem (often), the final "move" is a copy
into the checkpoint's path, and a kill during the copy leaves a truncated last.ckpt, the one
file a resume needs. Here the temporary file sits next to the target, is flushed to disk, and
``os.replace`` swaps it in: readers see the old checkpoint or the new one, nothing between.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def atomic_torch_save(payload: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with `atomic_torch_save` for local paths (URLs keep Lightning's)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, str(path), storage_options)
        atomic_torch_save(checkpoint, path)
