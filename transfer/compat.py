"""Everything that reaches below a library's public interface, in one place.

Each piece here depends on how a library works inside, which a minor release may change; each has a
test that fails when it no longer holds (named in its docstring), so an upgrade breaks here, loudly,
and nowhere else. Nothing outside this module reads a private attribute of Lightning, timm,
LitServe or huggingface_hub.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint


def logged_step(trainer: L.Trainer) -> int:
    """The step the loggers write at: Lightning's count of optimizer steps in this fit, restored from a
    checkpoint when resuming (``fit_loop.epoch_loop._batches_that_stepped``; tests/test_loggers.py)."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def start_logging_at(trainer: L.Trainer, step: int) -> None:
    """Make the loggers' step axis of this fit start at ``step`` (where the previous stage's fit
    stopped), unless a resumed fit already stands further on."""
    epoch_loop = trainer.fit_loop.epoch_loop
    epoch_loop._batches_that_stepped = max(epoch_loop._batches_that_stepped, step)


class LatestBestCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (``save_top_k=1``), except that an epoch that ties the best
    score so far replaces it: the later epoch has trained longer for the same validation score.

    Ties are what small validation splits produce: on 2 validation images accuracy takes three
    values, reaches 1.0 after a step or two and stays there, and keeping the first such epoch would
    test a model that has hardly trained. On a validation split of hundreds of images ties are rare
    and this changes nothing. It overrides ``check_monitor_top_k``, the method Lightning decides
    with (strictly better only); tests/test_schedule.py checks the tie rule.
    """

    def check_monitor_top_k(self, trainer: L.Trainer, current: torch.Tensor | None = None) -> bool:
        if current is None:
            return False
        if self.save_top_k == -1 or len(self.best_k_models) < self.save_top_k:
            return True
        at_least = {"min": torch.le, "max": torch.ge}[self.mode]
        decision = bool(at_least(current, self.best_k_models[self.kth_best_model_path]))
        # With several processes, all must agree (as Lightning's own check does).
        return bool(trainer.strategy.reduce_boolean_decision(decision))


# The beta of the running loss average in Lightning's learning-rate finder (its ``_LRCallback``).
LR_FINDER_SMOOTHING = 0.98


def unbiased_lr_finder_losses(smoothed: list[float], beta: float = LR_FINDER_SMOOTHING) -> list[float]:
    """Lightning 2.6 divides the finder's running average after n steps by 1 - beta**(n + 1)
    instead of 1 - beta**n, so the curve starts at about half the real loss and climbs for tens of
    steps: the steepest descent, and so the suggestion, lands on that artefact. This undoes it
    (tests/test_train.py checks it against Lightning on a constant loss: if Lightning fixes its
    correction, that test fails and this goes)."""
    return [loss * (1 - beta ** (n + 1)) / (1 - beta**n) for n, loss in enumerate(smoothed, start=1)]


@contextlib.contextmanager
def hub_cache_only() -> Iterator[None]:
    """Let huggingface_hub answer from its local cache only, as ``HF_HUB_OFFLINE=1`` in the
    environment does; it reads that variable once, at import, into ``constants.HF_HUB_OFFLINE``,
    which this sets for the duration (tests/test_backbones.py, the unreachable-hub test)."""
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def hub_offline() -> bool:
    """Whether huggingface_hub was started offline (``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_endpoint() -> str:
    """The Hugging Face hub's address huggingface_hub uses (``HF_ENDPOINT``)."""
    from huggingface_hub import constants

    return str(constants.ENDPOINT)
