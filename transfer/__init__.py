"""transfer: fine-tune pretrained timm backbones on your images with Lightning and Hydra.

``from transfer import fine_tune, load_model`` (`transfer.api`); importing the package alone imports none of
Lightning, timm or torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["FineTuneResult", "__version__", "fine_tune", "load_model"]

if TYPE_CHECKING:
    from transfer.api import FineTuneResult, fine_tune, load_model


def __getattr__(name: str) -> Any:
    if name in ("fine_tune", "FineTuneResult", "load_model"):
        from transfer import api

        return getattr(api, name)
    raise AttributeError(f"module 'transfer' has no attribute {name!r}")
