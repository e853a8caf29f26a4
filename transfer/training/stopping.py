"""When a stage is done: the patience and minimum improvement of ``patience: auto``, from the data.

A schedule's ``epochs`` are a maximum. A stage with a patience ends when its monitored validation
metric has not improved for that many epochs (Lightning's ``EarlyStopping``, whose state every
checkpoint keeps), and, with ``schedule.restore_best``, the next stage starts from the stage's
best weights rather than its last. How fast a validation metric can show progress depends on how
many images it is measured on: an accuracy on 30 images moves in steps of 3.3 points and has a
standard error of about 5 points at 90%, one on 2,000 images moves in steps of 0.05 points. So
``patience: auto`` is a function of the validation split's size ``n``:

* **patience**: 3 epochs at ``n >= 1000``, and one more for each tenfold fewer images
  (``3 + ceil(log10(1000 / n))``: 4 from 100 images, 5 from 10), since on a small validation set a
  model that still improves shows it as a new best less often; and never fewer epochs than make
  `MIN_PATIENCE_STEPS` optimizer steps (on 20 images an epoch is one step);
* **minimum improvement** (``schedule.min_delta: auto``): for a metric to maximise (accuracy, F1,
  AUROC, mAP: fractions of the validation images) half a validation image, ``0.5 / n``, so a gain
  of one image counts while float rounding and sub-image wobbles of F1 or AUROC do not; for a
  metric to minimise (a loss, a mean absolute error, in the task's units) 0: any decrease counts.

A metric at its ceiling (accuracy 1.0 after the first epoch) never improves again, so such a stage
ends ``patience`` epochs later. Every process of a DDP run reaches the same decision
(``EarlyStopping`` reduces it across processes), so all stop at the same step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_PATIENCE_STEPS = 10  # a patience shorter than this many optimizer steps sees too few updates


@dataclass(frozen=True)
class PlateauRule:
    patience: int  # epochs without improvement that end the stage
    min_delta: float  # the smallest change of the monitored metric that counts as an improvement
    why: str  # the rule in words, for the plan's notes


def auto_patience(val_images: int, steps_per_epoch: int) -> int:
    """``3 + ceil(log10(1000 / n))`` epochs (3 at ``n >= 1000``), at least `MIN_PATIENCE_STEPS` steps."""
    by_size = 3 + max(0, math.ceil(math.log10(1000 / max(1, val_images)) - 1e-9))
    return max(by_size, math.ceil(MIN_PATIENCE_STEPS / max(1, steps_per_epoch)))


def auto_min_delta(val_images: int, mode: str) -> float:
    """Half a validation image for a metric to maximise (a fraction of the images); 0 to minimise."""
    return 0.5 / max(1, val_images) if mode == "max" else 0.0


def plateau_rule(val_images: int, steps_per_epoch: int, mode: str, min_delta: float | str | None) -> PlateauRule:
    """The automatic patience, and ``min_delta`` (``auto``, or a number as ``schedule.min_delta`` gives it)."""
    patience = auto_patience(val_images, steps_per_epoch)
    delta = auto_min_delta(val_images, mode) if min_delta in (None, "auto") else float(min_delta)
    return PlateauRule(
        patience,
        delta,
        f"patience auto: {patience} epoch(s) for {val_images} validation image(s) "
        f"(3 + ceil(log10(1000 / n)), at least {MIN_PATIENCE_STEPS} steps), min_delta {delta:.4g}",
    )
