"""What a run learns from its labels: a task owns how labels are read, the head's size, the loss,
the decoding of the model's outputs (class or tag probabilities, values), decisions, metrics and
the columns its predictions write. A task of your own is one module with a `Task` subclass and a
``conf/task/<name>.yaml`` naming it by ``_target_``; checkpoints record its class, so every
command loads it wherever that module imports.

The LightningModule, `evaluate`, `predict`, `explain`, `export` and the server consult the run's
task (recorded in every checkpoint) instead of assuming a softmax classifier. `TASKS` names the
packaged ones. Reports for people (evaluate's tables and figures) are built from a task's outputs
in `transfer.inference.reports`; tasks do not know about them.
"""

from __future__ import annotations

from typing import Any

from transfer.data.table import IGNORE
from transfer.errors import TransferError
from transfer.tasks.base import Task
from transfer.tasks.classification import Classification
from transfer.tasks.multilabel import Multilabel
from transfer.tasks.ordinal import Ordinal
from transfer.tasks.regression import Regression

TASKS: dict[str, type[Task]] = {
    "classification": Classification,
    "ordinal": Ordinal,
    "multilabel": Multilabel,
    "regression": Regression,
}


def task_record(task: Task) -> dict[str, Any]:
    """What a checkpoint keeps of its task: ``state()`` and the class, so a task defined outside
    this package (a user's module on the Python path, configured by ``_target_``) loads too."""
    return {**task.state(), "class": f"{type(task).__module__}.{type(task).__qualname__}"}


def task_from_state(state: dict[str, Any] | None) -> Task:
    """The task a checkpoint records (``checkpoint["transfer"]["task"]``); classification when absent."""
    state = dict(state or {"name": "classification"})
    name, path = state.pop("name"), state.pop("class", None)
    if name in TASKS:
        return TASKS[name](**state)
    if path is not None:
        from hydra.utils import get_class

        try:
            return get_class(path)(**state)
        except (ImportError, AttributeError, ValueError) as error:
            raise TransferError(
                f"The checkpoint was trained for task '{name}' ({path}), which cannot be "
                f"imported here: {error}. Put its module on the Python path."
            ) from None
    raise TransferError(
        f"The checkpoint was trained for task '{name}', which this version does not know; it knows {sorted(TASKS)}."
    )


__all__ = [
    "IGNORE",
    "TASKS",
    "Classification",
    "Multilabel",
    "Ordinal",
    "Regression",
    "Task",
    "task_from_state",
    "task_record",
]
