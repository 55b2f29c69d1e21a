"""``TokenThroughput``: training tokens per second, logged without waiting for the device."""

from __future__ import annotations

import time

from lightning.pytorch import Callback


class TokenThroughput(Callback):
    """Logs ``train/tokens_per_sec``: a batch's non-pad target tokens over the time of its forward,
    backward and optimizer step (data loading is not counted).

    The count is the module's ``batch_tokens`` (:class:`TokenLevelModule` sets it in
    ``training_step``), a device tensor: the logger reads it only every ``log_every_n_steps``, so no
    step waits for the device here.
    """

    def __init__(self) -> None:
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        pl_module.log("train/tokens_per_sec", pl_module.batch_tokens / elapsed, batch_size=1)
