"""User-facing errors: one paragraph that names what failed and how to fix it.

`train.py` prints these without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class TransferError(Exception):
    """An error caused by the user's input, config or environment, with the fix in its message."""


class WeightsUnavailableError(TransferError):
    """Pretrained weights were requested but could not be obtained."""


class DataError(TransferError):
    """The dataset is missing, malformed or cannot be fetched."""


class ImageReadError(DataError):
    """One image file could not be decoded; the message names the file."""


class ScheduleError(TransferError):
    """The freezing schedule cannot be applied to this model."""


def user_error_in(error: BaseException) -> TransferError | None:
    """The `TransferError` behind ``error``, if any (Hydra's instantiate wraps what targets raise)."""
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, TransferError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
