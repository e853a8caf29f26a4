"""What a run learns from its labels: a task owns how labels are read, the head's size, the loss,
the decoding of the model's outputs (class or tag probabilities, values), decisions, metrics and
the columns its predictions write.

The LightningModule, `evaluate`, `predict`, `explain`, `export` and the server consult the run's
task (recorded in every checkpoint) instead of assuming a softmax classifier, so a new task is one
module here, a config in ``conf/task/`` and an entry in `TASKS`.
"""

from __future__ import annotations

from typing import Any

from transfer.errors import TransferError
from transfer.tasks.base import Task
from transfer.tasks.classification import Classification
from transfer.tasks.multilabel import Multilabel
from transfer.tasks.ordinal import Ordinal
from transfer.tasks.regression import Regression

TASKS: dict[str, type[Task]] = {"classification": Classification, "ordinal": Ordinal, "multilabel": Multilabel,
                                "regression": Regression}


def task_from_state(state: dict[str, Any] | None) -> Task:
    """The task a checkpoint records (``checkpoint["transfer"]["task"]``); classification when absent."""
    state = dict(state or {"name": "classification"})
    name = state.pop("name")
    if name not in TASKS:
        raise TransferError(f"The checkpoint was trained for task '{name}', which this version does not know; "
                            f"it knows {sorted(TASKS)}.")
    return TASKS[name](**state)


__all__ = ["TASKS", "Classification", "Multilabel", "Ordinal", "Regression", "Task", "task_from_state"]
