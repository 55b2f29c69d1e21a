"""``TrainingDoctor``: a callback that stops or warns on the usual ways Transformer training goes wrong.

It raises :class:`TrainingProblem` (or :class:`TrainingDiverged`) for faults that make further steps
pointless — a non-finite loss, parameters that get no gradient, a zero or non-finite learning rate,
masks that let the decoder see the future or the encoder see padding — and warns with
:class:`TrainingWarning` for signs that may be intended: a loss rising in the first steps, a loss
stuck at its initial value, a very large learning rate, bf16 asked of a device that emulates it. Every
message names the problem and a fix.
"""

from __future__ import annotations

import math
from collections import deque
from statistics import fmean
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from ..precision import BF16MasterWeights, bf16_is_faster, device_name

if TYPE_CHECKING:
    from ..modules.seq2seq import Seq2SeqTransformer


class TrainingProblem(RuntimeError):
    """A fault that makes further training pointless; checkpoints already written are left intact."""


class TrainingDiverged(TrainingProblem):
    """The training loss became NaN or infinite."""


class TrainingWarning(UserWarning):
    """A sign of trouble that may be intended (filter it with ``warnings.filterwarnings``)."""


class TrainingDoctor(Callback):
    """Watch a training run for the common Transformer failures.

    At each backward the loss is checked for NaN/inf, and the logged ``loss_key`` (a per-token mean)
    feeds the trend checks, which watch runs started from step 0 and compare means over ``window``
    batches. Costs a host sync per batch, after the forward, and three forward passes over two
    sentences on the first batch.

    Args:
        early_steps: optimizer steps during which a rising loss is reported; covers a typical warm-up.
        explode_factor: warn when, within ``early_steps``, the recent mean loss exceeds this multiple
            of the lowest mean so far, the initial one included (1.5: far above batch-to-batch noise,
            well below a real divergence).
        stuck_steps: at this optimizer step, check that the loss has left its initial value.
        min_drop: the fraction the recent mean loss must have fallen below the initial mean by
            ``stuck_steps`` (0.05; a learning model has usually dropped far more by then).
        window: training batches averaged into the initial mean (the first ones) and the recent mean.
        max_lr: warn when a learning rate exceeds this (1e-2; Transformers trained with Adam diverge
            far below it, the paper's peak is 7e-4).
        check_masks: on the first batch, probe a :class:`Seq2SeqTransformer` for masks that leak
            future target tokens or source padding.
        loss_key: the metric logged every training step that the trend checks read; when it is not
            logged they read the loss given to backward (scaled by the GradScaler under 16-mixed).
    """

    def __init__(self, early_steps: int = 100, explode_factor: float = 1.5, stuck_steps: int = 200,
                 min_drop: float = 0.05, window: int = 10, max_lr: float = 1e-2, check_masks: bool = True,
                 loss_key: str | None = "train/loss") -> None:
        if window < 1 or explode_factor <= 1.0 or not 0.0 <= min_drop < 1.0:
            raise ValueError(f"TrainingDoctor needs window >= 1, explode_factor > 1 and 0 <= min_drop < 1, got "
                             f"window={window}, explode_factor={explode_factor}, min_drop={min_drop}.")
        self.early_steps, self.explode_factor, self.stuck_steps = early_steps, explode_factor, stuck_steps
        self.min_drop, self.window, self.max_lr = min_drop, window, max_lr
        self.check_masks, self.loss_key = check_masks, loss_key
        self._initial: list[float] = []
        self._recent: deque[float] = deque(maxlen=window)
        self._lowest = math.inf
        self._watch_trend = self._checked_grads = self._checked_masks = self._checked_stuck = False
        self._lr_steps, self._lr_was_positive = 0, False
        self._warned: set[str] = set()

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The plugin makes this choice itself; an explicit precision is the user's, so it is only named.
        device = trainer.strategy.root_device
        if (trainer.precision in ("bf16-mixed", "bf16-true")
                and not isinstance(trainer.precision_plugin, BF16MasterWeights) and not bf16_is_faster(device)):
            self._warn_once("bf16", (
                f"trainer.precision is {trainer.precision}, but bf16 is slower than float32 on this "
                f"{device_name(device)}, which emulates it (a CPU without AVX512-BF16 or AMX, a GPU before "
                "Ampere). Train in float32 (trainer.precision: 32-true), or use trainer.plugins: "
                "[lightning_transformer.BF16MasterWeights], which trains in bf16 only where bf16 is faster."
            ))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A resumed run's first losses are no "initial" loss: the trend checks would misfire.
        self._watch_trend = trainer.global_step == 0

    # ----- mask probe -------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if not self.check_masks or self._checked_masks:
            return
        self._checked_masks = True
        from ..modules.seq2seq import Seq2SeqTransformer  # here, not above: the model imports .resume

        if not isinstance(pl_module, Seq2SeqTransformer):
            rank_zero_info(f"TrainingDoctor: {type(pl_module).__name__} is no Seq2SeqTransformer; mask probe skipped.")
        elif isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
            rank_zero_info("TrainingDoctor: sharded weights cannot run outside the strategy; mask probe skipped.")
        else:
            probe_masks(pl_module, batch)

    # ----- loss -------------------------------------------------------------------------------
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        step = trainer.global_step
        value = loss.detach().float().item()
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"the training loss is {value} at step {step}; training diverged and this step was not applied. "
                "Lower the learning rate or lengthen the warm-up (model.lr / model.lr_factor, model.warmup_steps), "
                "enable gradient clipping (trainer.gradient_clip_val: 1.0), prefer bf16-mixed over 16-mixed "
                "precision, and resume from the last good checkpoint."
            )
        if not self._watch_trend:
            return
        logged = trainer.callback_metrics.get(self.loss_key) if self.loss_key else None
        self._check_trend(value if logged is None else float(logged), step, trainer)

    def _check_trend(self, value: float, step: int, trainer: Trainer) -> None:
        if len(self._initial) < self.window:
            self._initial.append(value)
        self._recent.append(value)
        if len(self._initial) < self.window:
            return
        initial, recent = fmean(self._initial), fmean(self._recent)
        # Against the lowest mean, not only the initial one: a diverging Transformer often climbs back
        # towards its initial loss after a good start rather than far above it.
        self._lowest = min(self._lowest, recent)
        if step < self.early_steps and recent > self.explode_factor * self._lowest:
            clip = "" if trainer.gradient_clip_val else " and enable gradient clipping (trainer.gradient_clip_val: 1.0)"
            self._warn_once("explode", (
                f"the training loss rose to {recent:.4g} by step {step}, {recent / self._lowest:.1f}x its lowest "
                f"{self._lowest:.4g}: training is diverging. Lower the learning rate or lengthen the warm-up "
                f"(model.lr / model.lr_factor, model.warmup_steps){clip}."
            ))
        if step >= self.stuck_steps and not self._checked_stuck:
            self._checked_stuck = True
            if recent > (1.0 - self.min_drop) * initial:
                self._warn_once("stuck", (
                    f"the training loss is {recent:.4g} after {step} steps, within {self.min_drop:.0%} of its initial "
                    f"{initial:.4g}: the model is not learning. Check the learning rate (train/lr), that gradients "
                    "reach the parameters, that sources and targets are aligned, and the masks of make_masks."
                ))

    # ----- gradients and learning rate --------------------------------------------------------
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        # Runs once per optimizer step, after every accumulated micro-batch's backward.
        if not self._checked_grads:
            self._checked_grads = True
            check_gradients(pl_module)
        self._check_lr(optimizer, trainer.global_step)

    def _check_lr(self, optimizer, step: int) -> None:
        lrs = [float(group["lr"]) for group in optimizer.param_groups]
        if any(not math.isfinite(lr) or lr < 0 for lr in lrs):
            raise TrainingProblem(f"the learning rate is {lrs} at step {step}; check the scheduler's multiplier "
                                  "(model.scheduler, model.lr / model.lr_factor, model.warmup_steps).")
        self._lr_steps += 1
        if max(lrs) > 0:
            self._lr_was_positive = True
        elif self._lr_steps > 1 and not self._lr_was_positive:
            # A warm-up may start at 0 for a step and a cosine may end at 0: only a lr that never left 0 is a fault.
            raise TrainingProblem(
                f"the learning rate has been 0 for the first {self._lr_steps} optimizer steps of this run, so nothing "
                "is learned; set model.lr (cosine) or model.lr_factor (noam) above 0."
            )
        if max(lrs) > self.max_lr:
            self._warn_once("max_lr", (
                f"the learning rate {max(lrs):.3g} at step {step} exceeds max_lr={self.max_lr:g}; Transformers trained "
                "with Adam diverge at such rates. Lower model.lr / model.lr_factor or lengthen model.warmup_steps "
                "(or raise TrainingDoctor's max_lr if intended)."
            ))

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            rank_zero_warn(message, category=TrainingWarning)


def check_gradients(module: torch.nn.Module) -> None:
    """Raise :class:`TrainingProblem` if a trainable parameter got no gradient from backward."""
    # Empty shards (FSDP) legitimately have no gradient.
    missing = [name for name, p in module.named_parameters() if p.requires_grad and p.numel() and p.grad is None]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise TrainingProblem(
            f"{len(missing)} trainable parameters got no gradient from the first backward: {shown}. A hook "
            "detaches its output or runs under torch.no_grad, or a module is unused; freeze parameters "
            "deliberately with requires_grad_(False)."
        )


def probe_masks(model: Seq2SeqTransformer, batch) -> None:
    """Raise :class:`TrainingProblem` if ``model`` lets a target position see later targets or source padding.

    Runs ``model(src, tgt_input)`` (masks from :meth:`make_masks`) on two sentences of ``batch`` in
    eval mode without gradients, changing the targets from the middle on, then appending padding to
    the source; each module's train/eval mode is restored.
    """
    src, tgt = model.unpack_batch(batch)
    src, tgt_input = src[:2], model.shift_targets(tgt[:2])[0]
    if tgt_input.size(1) < 2:
        return
    pad, half = model.pad_token_id, tgt_input.size(1) // 2
    future = tgt_input.clone()
    shifted = (future[:, half:] + 1) % model.tgt_vocab_size
    future[:, half:] = shifted.masked_fill(shifted == pad, (pad + 1) % model.tgt_vocab_size)
    extra = min(3, model.hparams.get("max_len", math.inf) - src.size(1))
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            logits = model(src, tgt_input)
            sees_future = _differs(logits[:, :half], model(src, future)[:, :half])
            sees_padding = extra > 0 and _differs(logits, model(F.pad(src, (0, extra), value=pad), tgt_input))
    finally:
        for module, training in modes.items():
            module.training = training
    if sees_future:
        raise TrainingProblem(
            f"changing target tokens from position {half} on changed the outputs before it: the decoder "
            "self-attention sees future tokens. Check make_masks: the target mask must be causal (True = may attend)."
        )
    if sees_padding:
        raise TrainingProblem(
            "appending padding to the source changed the outputs: attention reads source padding. Check "
            "make_masks: the source mask must be False at padding (True = may attend)."
        )


def _differs(a: Tensor, b: Tensor) -> bool:
    # Appending keys reorders float sums: allow rounding noise, far below what a leak changes.
    tolerance = (1e-4 if a.dtype in (torch.float32, torch.float64) else 3e-2) * (1.0 + a.abs().max().item())
    return (a - b).abs().max().item() > tolerance
