"""``TokenLevelModule``: what every next-token objective shares, whatever the network.

A subclass supplies :meth:`~TokenLevelModule.teacher_force` (shift, masks, forward) and
:meth:`~TokenLevelModule.output_projection`; this class owns the label-smoothed loss and its
normalisation over the optimizer step's tokens, evaluation loss and perplexity, Adam with the Noam or
cosine schedule, and the resume state.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import Tensor, nn
from torchmetrics import MeanMetric

from ..callbacks.completion import CompletionCheck
from ..callbacks.resume import ResumeRandomState
from ..data.batch import is_filler, unpack_batch
from ..losses import LabelSmoothingLoss, ProjectedLabelSmoothingLoss, compute_loss
from ..schedules import cosine_length, cosine_schedule, noam_schedule, paper_adam


class TokenLevelModule(LightningModule):
    """Base LightningModule for label-smoothed next-token training.

    Every target token of an optimizer step weighs the same, however the step is split into
    micro-batches (``accumulate_grad_batches``) and ranks (DDP, FSDP). ``training_step`` returns the
    plain mean loss; the weighting happens in :meth:`backward` and :meth:`on_before_optimizer_step`.

    Subclasses save hyperparameters named ``scheduler``, ``warmup_steps``, ``lr_factor``, ``lr``,
    ``min_lr_ratio``, ``total_steps``, ``betas``, ``eps``, ``weight_decay`` and ``d_model``.

    Args:
        vocab_size: size of the predicted vocabulary.
        pad_token_id: padding id, ignored by the loss.
        label_smoothing: epsilon of the label-smoothed loss.
    """

    def __init__(self, vocab_size: int, pad_token_id: int, label_smoothing: float) -> None:
        super().__init__()
        self.pad_token_id = pad_token_id
        self.criterion = ProjectedLabelSmoothingLoss(vocab_size, label_smoothing, pad_token_id)
        self.logits_criterion = LabelSmoothingLoss(vocab_size, label_smoothing, pad_token_id)
        self.eval_loss, self.eval_nll = MeanMetric(), MeanMetric()
        self.batch_tokens: Tensor | int = 0  # non-pad targets of the last training batch, on its device
        self._step_tokens: Tensor | int = 0

    # ----- hooks a subclass provides ----------------------------------------------------------
    def teacher_force(self, batch) -> tuple[Tensor, Tensor]:
        """Shift, masks, forward: ``(decoder states (B, T, D), targets (B, T))`` of a batch."""
        raise NotImplementedError(f"{type(self).__name__} must implement teacher_force(batch).")

    def output_projection(self) -> nn.Linear:
        """The bias-free linear layer from states to logits (fused into the default loss)."""
        raise NotImplementedError(f"{type(self).__name__} must implement output_projection().")

    # ----- research hooks ---------------------------------------------------------------------
    unpack_batch = staticmethod(unpack_batch)  # a hook: a subclass reads its own batch format

    def project(self, states: Tensor) -> Tensor:
        """Decoder output ``(B, T, D)`` -> logits ``(B, T, V)``."""
        return self.output_projection()(states)

    def compute_loss(self, states: Tensor, targets: Tensor) -> Tensor:
        """Label-smoothed cross-entropy of decoder output ``(B, T, D)``, averaged over non-pad targets.

        The projection is fused into the loss, so ``(B, T, V)`` logits are never stored, unless
        :meth:`project` is overridden: then the loss is taken on its logits.
        """
        if self._projects_by_default():
            return self.criterion(states, self.output_projection().weight, targets)
        return self.logits_criterion(self.project(states), targets)

    def compute_nll(self, states: Tensor, targets: Tensor) -> Tensor:
        """Unsmoothed cross-entropy per non-pad target (perplexity is its exponential)."""
        if self._projects_by_default():
            return self.criterion(states, self.output_projection().weight, targets, return_nll=True)[1]
        return compute_loss(self.project(states), targets, self.pad_token_id)

    # ----- steps ------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> Tensor:
        """The mean label-smoothed loss over the batch's non-pad targets."""
        states, targets = self.teacher_force(batch)  # shift, masks, forward
        loss = self.compute_loss(states, targets)
        self.batch_tokens = (targets != self.pad_token_id).sum()  # weighs this batch in backward
        self.log("train/loss", loss, prog_bar=True, batch_size=targets.size(0))
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch)

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    # ----- loss normalisation over the optimizer step -----------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        name = type(self).__name__
        if not self.automatic_optimization:
            raise ValueError(f"{name} weighs tokens across an optimizer step through automatic optimisation; "
                             "keep automatic_optimization=True, or override backward and on_before_optimizer_step.")
        if isinstance(self.trainer.strategy, DeepSpeedStrategy):
            raise ValueError(f"{name} cannot run under DeepSpeed, which bypasses the backward hook that weighs "
                             "tokens; use strategy='ddp' or 'fsdp'.")

    def backward(self, loss: Tensor, *args, **kwargs) -> None:
        # Weighting here, not in training_step, keeps that step a plain mean that runs anywhere (a
        # notebook, Fabric) and to which a subclass adds terms; only the Trainer's backward knows it
        # serves one micro-batch of an optimizer step. The loss arrives divided by
        # accumulate_grad_batches, and DDP/FSDP average gradients over ranks: both are undone, so
        # the gradients sum over the step's tokens until on_before_optimizer_step divides them.
        self._step_tokens = self._step_tokens + self.batch_tokens
        weight = self.batch_tokens * (self.trainer.accumulate_grad_batches * self.trainer.world_size)
        super().backward(loss * weight, *args, **kwargs)

    def on_before_optimizer_step(self, optimizer) -> None:
        step_tokens = torch.as_tensor(self._step_tokens, device=self.device)
        if dist.is_available() and dist.is_initialized():
            # Not strategy.reduce, which waits at a barrier first; the sum stays on the device.
            dist.all_reduce(step_tokens)
        self._step_tokens = 0
        scale = 1.0 / step_tokens.clamp(min=1).float()
        # The optimizer's parameters: the model's, or the float32 masters of BF16MasterWeights.
        for parameter in (p for group in optimizer.param_groups for p in group["params"]):
            if parameter.grad is not None:
                parameter.grad.mul_(scale.to(parameter.grad.dtype))

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Checked at each epoch's first batch only: on a GPU, reading the count waits for the step.
        if batch_idx == 0 and int(self.batch_tokens) == 0:
            raise ValueError(
                "every target token of this training batch is padding, so there is nothing to learn from; check "
                f"that the data's padding id equals model.pad_token_id={self.pad_token_id} and that targets are "
                "not empty."
            )

    # ----- optimisation, resuming -------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        adam = paper_adam(self.parameters(), hp.lr_factor if hp.scheduler == "noam" else hp.lr, hp.betas, hp.eps,
                          hp.weight_decay)
        if hp.scheduler == "noam":
            # LambdaLR multiplies the base lr by noam_lambda, so the base lr *is* the factor.
            scheduler = noam_schedule(adam, hp.d_model, hp.warmup_steps)
        elif hp.scheduler == "cosine":
            total = cosine_length(hp.total_steps, self.trainer.estimated_stepping_batches, hp.warmup_steps)
            scheduler = cosine_schedule(adam, hp.warmup_steps, total, hp.min_lr_ratio)
        else:
            raise ValueError(f"scheduler must be 'noam' or 'cosine', got {hp.scheduler!r}.")
        # "name": the key LearningRateMonitor logs the lr under. It appends a group's own name where the group has one
        # (paper_adam names weight decay's groups "lr" and "lr_undecayed"), so the key stays train/lr either way.
        name = "train" if "name" in adam.param_groups[0] else "train/lr"
        return {"optimizer": adam, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": name}}

    def configure_callbacks(self) -> list[Callback]:
        return [ResumeRandomState(), CompletionCheck()]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # translate and average rebuild the class that trained, not the base class.
        checkpoint["model_class"] = f"{type(self).__module__}.{type(self).__qualname__}"

    # ----- evaluation -------------------------------------------------------------------------
    def _projects_by_default(self) -> bool:
        return type(self).project is TokenLevelModule.project

    def _evaluate(self, batch) -> None:
        states, targets = self.teacher_force(batch)
        # A filler batch runs only so that this rank keeps step with the others: it weighs nothing.
        tokens = 0 if is_filler(batch) else (targets != self.pad_token_id).sum()
        hooks = type(self).compute_loss, type(self).compute_nll
        if hooks != (TokenLevelModule.compute_loss, TokenLevelModule.compute_nll):  # an override decides
            loss, nll = self.compute_loss(states, targets), self.compute_nll(states, targets)
        elif self._projects_by_default():  # one fused pass over the vocabulary gives both values
            loss, nll = self.criterion(states, self.output_projection().weight, targets, return_nll=True)
        else:
            logits = self.project(states)
            loss, nll = self.logits_criterion(logits, targets), compute_loss(logits, targets, self.pad_token_id)
        # Token-weighted means, synced across processes by torchmetrics: a corpus-level value.
        self.eval_loss.update(loss, weight=tokens)
        self.eval_nll.update(nll, weight=tokens)

    def _log_evaluation(self, stage: str) -> None:
        loss, nll = self.eval_loss.compute(), self.eval_nll.compute()
        self.eval_loss.reset()
        self.eval_nll.reset()
        self.log_dict({f"{stage}/loss": loss, f"{stage}/nll": nll, f"{stage}/ppl": nll.exp()}, prog_bar=True)
