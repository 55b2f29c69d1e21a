"""``CompletionCheck``: a run that ends before its schedule says so, at the stop and in its logged metrics."""

from __future__ import annotations

import math

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.utilities import rank_zero_warn


class RunCutShort(UserWarning):
    """Training stopped before the schedule its config asks for (``max_steps`` or ``max_epochs``)."""


class CompletionCheck(Callback):
    """Log ``train/schedule_done``, the fraction of the scheduled optimizer steps trained, and warn below 1.

    The schedule is ``trainer.estimated_stepping_batches``: ``max_steps``, or ``max_epochs`` worth of
    steps. ``max_time`` is a safety net; when it (or an interrupt, or another callback) ends the run
    early, the learning-rate decay, the last checkpoints and anything averaged from them belong to a
    shorter run than the config describes, which is worth one loud line.
    """

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        scheduled = trainer.estimated_stepping_batches
        if not math.isfinite(scheduled) or scheduled <= 0:
            return
        done = min(trainer.global_step / scheduled, 1.0)
        for logger in trainer.loggers:
            logger.log_metrics({"train/schedule_done": done}, step=trainer.global_step)
            logger.save()
        if done < 1.0:
            rank_zero_warn(
                f"training stopped at optimizer step {trainer.global_step} of the {int(scheduled)} scheduled "
                f"({done:.1%}) because {self._reason(trainer)}; the learning-rate schedule and the last checkpoints "
                "are those of a shorter run. Raise trainer.max_time (a safety net, not the schedule) or shorten "
                "max_steps/max_epochs to what the machine trains in time.",
                category=RunCutShort,
            )

    @staticmethod
    def _reason(trainer: Trainer) -> str:
        if trainer.interrupted:
            return "it was interrupted"
        timers = [c for c in trainer.callbacks if isinstance(c, Timer)]
        if any((timer.time_remaining() or 0.0) <= 0 for timer in timers):
            return "trainer.max_time ran out"
        return "a callback asked it to stop (e.g. early stopping)"
