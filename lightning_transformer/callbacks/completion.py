"""``CompletionCheck``: a run that ends before its schedule says so, at the stop and in its logged metrics."""

from __future__ import annotations

import math
import time

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.utilities import rank_zero_warn


class RunCutShort(UserWarning):
    """Training stopped before the schedule its config asks for (``max_steps`` or ``max_epochs``)."""


class RunWillBeCutShort(RunCutShort):
    """At the rate trained so far, ``max_time`` will run out before the schedule ends."""


class CompletionCheck(Callback):
    """Log ``train/schedule_done``, the fraction of the scheduled optimizer steps trained, and warn below 1.

    The schedule is ``trainer.estimated_stepping_batches``: ``max_steps``, or ``max_epochs`` worth of
    steps. ``max_time`` is a safety net; when it (or an interrupt, or another callback) ends the run
    early, the learning-rate decay, the last checkpoints and anything averaged from them belong to a
    shorter run than the config describes, which is worth one loud line. The same machine can train
    at different speeds from one hour to the next, so the run also forecasts, once, after its first
    epoch or ``forecast_after_steps`` steps, whichever comes first: if ``max_time`` will end it early
    at the rate so far, it warns then, when a shorter schedule can still be chosen.
    """

    def __init__(self, forecast_after_steps: int = 200) -> None:
        self.forecast_after_steps = forecast_after_steps
        self._start: tuple[float, int] | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = (time.monotonic(), trainer.global_step)

    def on_train_batch_end(self, trainer: Trainer, *args) -> None:
        if self._start is not None and trainer.global_step - self._start[1] >= self.forecast_after_steps:
            self._forecast(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._start is not None:
            self._forecast(trainer)

    def _forecast(self, trainer: Trainer) -> None:
        (started, first_step), self._start = self._start, None
        scheduled, step = trainer.estimated_stepping_batches, trainer.global_step
        limits = [t.time_remaining() for t in trainer.callbacks if isinstance(t, Timer)]
        left = min((s for s in limits if s is not None), default=None)
        if left is None or not math.isfinite(scheduled) or not first_step < step < scheduled:
            return
        rate = (step - first_step) / (time.monotonic() - started)  # optimizer steps a second, validation included
        reached = step + int(rate * left)
        # Silent when the schedule fits, or when the stop is within a step and on_train_end says so.
        if (scheduled - step) / rate <= left or reached <= step:
            return
        rank_zero_warn(
            f"at the rate trained so far ({rate:.2f} optimizer steps/s), trainer.max_time will stop this run near "
            f"step {reached} of the {int(scheduled)} scheduled ({reached / scheduled:.0%}); its remaining "
            f"{int(scheduled) - step} steps need about {_duration((scheduled - step) / rate)} and "
            f"{_duration(left)} are left. Shorten max_steps/max_epochs to what this machine trains in time, "
            "or raise trainer.max_time.",
            category=RunWillBeCutShort,
        )

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


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"
