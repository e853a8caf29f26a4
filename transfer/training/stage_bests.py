"""The run's bookkeeping of best checkpoints: one per stage, the best of them tested at the end.

Each schedule stage is its own ``Trainer.fit`` with its own ``ModelCheckpoint``, so no Lightning
object sees the whole run. `StageBests` is one callback instance shared by every stage's trainer:
it collects each finished stage's best checkpoint and keeps the list in every checkpoint
(Lightning's callback state), together with the best epoch so far of the stage in progress. A run
resumed mid-stage therefore still lets the epochs before the interruption, of this stage and of
earlier ones, compete for the final test.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from transfer.compat import LatestBestCheckpoint
from transfer.errors import TransferError

__all__ = ["LatestBestCheckpoint", "StageBests"]

Record = dict[str, Any]  # {"stage": name, "path": checkpoint file, "score": monitored value}


def better(score: float, than: float, mode: str) -> bool:
    return score > than if mode == "max" else score < than


def record_of(stage: str, checkpoint: ModelCheckpoint) -> Record:
    score = checkpoint.best_model_score
    return {"stage": stage, "path": checkpoint.best_model_path, "score": None if score is None else float(score)}


class StageBests(L.Callback):
    """Best checkpoint of every finished stage (`records`), kept across resumes."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.records: list[Record] = []
        self.before_resume: Record | None = None  # the resumed stage's best epoch before the interruption
        self._stage: str | None = None
        self._checkpoint: ModelCheckpoint | None = None

    def watch(self, stage: str, checkpoint: ModelCheckpoint) -> None:
        """The stage about to be fitted and the callback that keeps its best epoch."""
        self._stage, self._checkpoint = stage, checkpoint

    def state_dict(self) -> dict[str, Any]:
        current = (
            record_of(self._stage, self._checkpoint)
            if self._stage is not None and self._checkpoint is not None and self._checkpoint.best_model_path
            else None
        )
        return {"records": list(self.records), "current": current}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records = list(state_dict.get("records", []))
        self.before_resume = state_dict.get("current")

    def finish_stage(self) -> Record:
        """The stage's best (the better of its checkpoint callback's and the one before a resume)."""
        assert self._stage is not None and self._checkpoint is not None, "watch() a stage first"
        record = record_of(self._stage, self._checkpoint)
        earlier, self.before_resume = self.before_resume, None
        if (
            earlier
            and earlier["stage"] == self._stage
            and earlier["score"] is not None
            and (record["score"] is None or better(earlier["score"], record["score"], self.mode))
        ):
            record = earlier
        self.records.append(record)
        self._stage, self._checkpoint = None, None
        return record

    def best(self) -> Record:
        """The best checkpoint over all finished stages (of equal scores, the later one)."""
        scored = [r for r in self.records if r.get("path") and r.get("score") is not None]
        if not scored:
            raise TransferError("No checkpoint was saved: did any validation run? Check the monitor metric.")
        best = scored[0]
        for record in scored[1:]:
            if not better(best["score"], record["score"], self.mode):  # a tie goes to the later stage
                best = record
        return best
