"""``Seq2SeqTransformer``: the LightningModule that trains :class:`Transformer` the paper's way.

Each step reads like the recipe: shift the target right, build masks, forward, label-smoothed
loss, log. Research code overrides one hook (``make_masks``, ``shift_targets``, ``encode``,
``decode_states``, ``project``, ``compute_loss``) instead of copying a step.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Literal

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule
from torch import Tensor
from torchmetrics import MeanMetric

from ..callbacks.resume import ResumeRandomState
from ..data.batch import is_filler, unpack_batch
from ..generation.decoding import beam_search
from ..losses import ProjectedLabelSmoothingLoss
from ..nn.masks import create_combined_mask, create_padding_mask
from ..nn.transformer import Transformer
from ..schedules import cosine_length, cosine_schedule, noam_schedule, paper_adam


class Seq2SeqTransformer(LightningModule):
    """Encoder-decoder Transformer for translation.

    Args:
        src_vocab_size: source vocabulary size (linked to the data module's by the CLI).
        tgt_vocab_size: target vocabulary size.
        d_model: model width (paper: 512 base, 1024 big).
        nhead: attention heads (8 base, 16 big).
        num_encoder_layers: encoder layers (6).
        num_decoder_layers: decoder layers (6).
        dim_feedforward: feed-forward inner width (2048 base, 4096 big).
        dropout: residual and embedding dropout (0.1 base, 0.3 big).
        attention_dropout: dropout on attention probabilities.
        activation_dropout: dropout after the feed-forward ReLU.
        norm_first: pre-norm layers instead of the paper's post-norm.
        share_embeddings: one embedding table for source and target (needs a joint vocabulary).
        tie_output_embeddings: the output projection reuses the target embeddings.
        max_len: longest source or target sequence, in tokens.
        pad_token_id: padding id, ignored by the loss and masked in attention.
        bos_token_id: id that starts every target sequence.
        eos_token_id: id that ends every sequence.
        label_smoothing: epsilon of the label-smoothed loss (paper: 0.1).
        scheduler: ``noam`` (paper) or ``cosine`` (linear warm-up, cosine decay to ``min_lr_ratio * lr``).
        warmup_steps: warm-up length in optimizer steps (paper: 4000).
        lr_factor: Noam multiplier; peak lr is ``lr_factor * (d_model * warmup_steps)^-0.5``.
        lr: peak learning rate of the cosine schedule.
        min_lr_ratio: cosine floor as a fraction of ``lr``.
        total_steps: cosine decay length; defaults to the Trainer's estimated stepping batches.
        betas: Adam betas (paper: 0.9, 0.98).
        eps: Adam epsilon (paper: 1e-9).
        weight_decay: Adam L2 penalty.
        beam_size: beam width of ``predict`` (paper: 4).
        length_penalty: GNMT length-penalty exponent alpha of beam search (paper: 0.6).
        max_decode_len_a: decoding stops after ``a * source_length + b`` tokens (``a``).
        max_decode_len_b: ``b`` of the same rule.
        activation_checkpointing: recompute each layer in backward instead of storing its
            activations (the guide's out-of-memory lever; see ``benchmarks/results``).
    """

    def __init__(
        self,
        src_vocab_size: int = 8000,
        tgt_vocab_size: int = 8000,
        d_model: int = 512,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        norm_first: bool = False,
        share_embeddings: bool = False,
        tie_output_embeddings: bool = True,
        max_len: int = 1024,
        pad_token_id: int = 0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        label_smoothing: float = 0.1,
        scheduler: Literal["noam", "cosine"] = "noam",
        warmup_steps: int = 4000,
        lr_factor: float = 1.0,
        lr: float = 5e-4,
        min_lr_ratio: float = 0.0,
        total_steps: int | None = None,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-9,
        weight_decay: float = 0.0,
        beam_size: int = 4,
        length_penalty: float = 0.6,
        max_decode_len_a: float = 1.2,
        max_decode_len_b: int = 10,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if warmup_steps <= 0:
            raise ValueError(f"warmup_steps must be positive, got {warmup_steps}; the paper uses 4000.")
        self.save_hyperparameters()
        self.d_model, self.tgt_vocab_size, self.pad_token_id = d_model, tgt_vocab_size, pad_token_id
        self.transformer = Transformer(
            src_vocab_size, tgt_vocab_size, d_model, nhead, num_encoder_layers, num_decoder_layers,
            dim_feedforward, dropout, attention_dropout, activation_dropout, norm_first,
            share_embeddings, tie_output_embeddings, pad_token_id, max_len, activation_checkpointing,
        )
        self.criterion = ProjectedLabelSmoothingLoss(tgt_vocab_size, label_smoothing, pad_token_id)
        self.eval_loss, self.eval_nll = MeanMetric(), MeanMetric()
        self._batch_tokens, self._batch_start, self._step_tokens = 0, 0.0, 0

    # ----- research hooks ---------------------------------------------------------------------
    def make_masks(self, src: Tensor, tgt_input: Tensor) -> tuple[Tensor, Tensor]:
        """Source padding mask ``(B, 1, 1, S)`` and target padding+causal mask ``(B, 1, T, T)``."""
        return create_padding_mask(src, self.pad_token_id), create_combined_mask(tgt_input, self.pad_token_id)

    def shift_targets(self, tgt: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher forcing: ``tgt[:, :-1]`` goes in, ``tgt[:, 1:]`` is predicted."""
        return tgt[:, :-1], tgt[:, 1:]

    def encode(self, src: Tensor, src_mask: Tensor | None) -> Tensor:
        """Source ids ``(B, S)`` -> memory ``(B, S, D)``."""
        return self.transformer.encode(src, src_mask)

    def decode_states(self, tgt_input: Tensor, memory: Tensor, tgt_mask: Tensor | None, src_mask: Tensor | None,
                      cache: list[dict] | None = None) -> Tensor:
        """Target prefix ``(B, T)`` over memory ``(B', S, D)`` -> decoder output ``(B, T, D)``.

        ``B'`` divides ``B``: each memory row serves ``B / B'`` consecutive target rows (beam search).

        ``cache`` (from :meth:`init_cache`) makes ``tgt_input`` only the new positions.
        """
        return self.transformer.decode_states(tgt_input, memory, tgt_mask, src_mask, cache)

    def project(self, states: Tensor) -> Tensor:
        """Decoder output ``(B, T, D)`` -> logits ``(B, T, V)``."""
        return self.transformer.generator(states)

    def decode(self, tgt_input: Tensor, memory: Tensor, tgt_mask: Tensor | None, src_mask: Tensor | None,
               cache: list[dict] | None = None) -> Tensor:
        """Logits ``(B, T, V)``: :meth:`project` of :meth:`decode_states` (what the searches call)."""
        return self.project(self.decode_states(tgt_input, memory, tgt_mask, src_mask, cache))

    def init_cache(self) -> list[dict]:
        """Empty incremental-decoding state for :meth:`decode`."""
        return self.transformer.init_cache()

    def compute_loss(self, states: Tensor, tgt_output: Tensor) -> Tensor:
        """Label-smoothed cross-entropy of decoder output ``(B, T, D)``, averaged over non-pad targets.

        The output projection is fused into the loss, so ``(B, T, V)`` logits are never stored; an
        override that wants logits calls ``self.project(states)``.
        """
        return self.criterion(states, self.transformer.generator.weight, tgt_output)

    def compute_nll(self, states: Tensor, tgt_output: Tensor) -> Tensor:
        """Unsmoothed cross-entropy per non-pad target (perplexity is its exponential)."""
        return self.criterion(states, self.transformer.generator.weight, tgt_output, return_nll=True)[1]

    # ----- forward and steps ------------------------------------------------------------------
    def forward(self, src: Tensor, tgt_input: Tensor, src_mask: Tensor | None = None,
                tgt_mask: Tensor | None = None) -> Tensor:
        """Logits ``(B, T, tgt_vocab)``; masks are built with :meth:`make_masks` when not given."""
        if src_mask is None or tgt_mask is None:
            default_src_mask, default_tgt_mask = self.make_masks(src, tgt_input)
            src_mask = default_src_mask if src_mask is None else src_mask
            tgt_mask = default_tgt_mask if tgt_mask is None else tgt_mask
        return self.decode(tgt_input, self.encode(src, src_mask), tgt_mask, src_mask)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        src, tgt = self.unpack_batch(batch)
        tgt_input, tgt_output = self.shift_targets(tgt)
        src_mask, tgt_mask = self.make_masks(src, tgt_input)
        states = self.decode_states(tgt_input, self.encode(src, src_mask), tgt_mask, src_mask)
        loss = self.compute_loss(states, tgt_output)
        self._batch_tokens = (tgt_output != self.pad_token_id).sum()  # for the throughput log
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.log("train/loss", loss, prog_bar=True, batch_size=src.size(0))
        self.log("train/lr", lr, batch_size=src.size(0))
        return self.token_sum_objective(loss, self._batch_tokens)

    # ----- loss normalisation over the optimizer step -----------------------------------------
    def token_sum_objective(self, mean_loss: Tensor, tokens: Tensor) -> Tensor:
        """What ``training_step`` hands to backward: this micro-batch's loss *summed* over its tokens.

        The factors undo Lightning's division by ``accumulate_grad_batches`` and DDP's average over
        ranks; :meth:`on_before_optimizer_step` then divides the gradients by the non-pad target tokens
        of the whole optimizer step, so every token weighs the same (fairseq's normalisation).
        """
        self._step_tokens = self._step_tokens + tokens
        return mean_loss * tokens * self.trainer.accumulate_grad_batches * self.trainer.world_size

    def on_before_optimizer_step(self, optimizer) -> None:
        step_tokens = torch.as_tensor(self._step_tokens, device=self.device)
        if dist.is_available() and dist.is_initialized():
            # Not strategy.reduce, which waits at a barrier first; the sum stays on the device.
            dist.all_reduce(step_tokens)
        self._step_tokens = 0
        scale = 1.0 / step_tokens.clamp(min=1)
        for parameter in self.parameters():
            if parameter.grad is not None:
                parameter.grad.mul_(scale.to(parameter.grad.dtype))

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch)

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    def predict_step(self, batch, batch_idx: int) -> dict[str, list]:
        """Beam search: ``{"tokens": ids without BOS/EOS/padding per sentence, "index": the batch's, if any}``."""
        if is_filler(batch):
            return {"tokens": [], "index": []}
        src = batch if isinstance(batch, Tensor) else self.unpack_batch(batch, need_target=False)[0]
        index = batch["index"].tolist() if isinstance(batch, Mapping) and "index" in batch else None
        return {"tokens": [hyps[0].tokens for hyps in self.translate_ids(src)], "index": index}

    def translate_ids(self, src: Tensor, beam_size: int | None = None, length_penalty: float | None = None) -> list[list]:
        """Beam search over source ids ``(B, S)``; arguments left ``None`` take this model's hyperparameters."""
        hp = self.hparams
        alpha = hp.length_penalty if length_penalty is None else length_penalty
        return beam_search(self, src, beam_size or hp.beam_size, hp.max_decode_len_a, hp.max_decode_len_b,
                           self.pad_token_id, hp.bos_token_id, hp.eos_token_id, alpha, max_positions=hp.max_len)

    # ----- throughput and resuming ------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Checked at each epoch's first batch only: on a GPU, reading the count waits for the step.
        if batch_idx == 0 and int(self._batch_tokens) == 0:
            raise ValueError(
                "every target token of this training batch is padding, so there is nothing to learn from; check "
                f"that the data's padding id equals model.pad_token_id={self.pad_token_id} and that targets are "
                "not empty."
            )
        # Forward, backward and the optimizer step; data loading is not counted. The token count stays
        # a device tensor: the logger reads it only every log_every_n_steps.
        elapsed = time.perf_counter() - self._batch_start
        self.log("train/tokens_per_sec", self._batch_tokens / max(elapsed, 1e-9), batch_size=1)

    def configure_callbacks(self) -> list[Callback]:
        return [ResumeRandomState()]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # translate and average rebuild the class that trained, not the base class.
        checkpoint["model_class"] = f"{type(self).__module__}.{type(self).__qualname__}"

    # ----- optimisation -----------------------------------------------------------------------
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
        return {"optimizer": adam, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----- helpers ----------------------------------------------------------------------------
    unpack_batch = staticmethod(unpack_batch)  # a hook: a subclass reads its own batch format

    def _evaluate(self, batch) -> None:
        src, tgt = self.unpack_batch(batch)
        tgt_input, tgt_output = self.shift_targets(tgt)
        src_mask, tgt_mask = self.make_masks(src, tgt_input)
        states = self.decode_states(tgt_input, self.encode(src, src_mask), tgt_mask, src_mask)
        # A filler batch runs only so that this rank keeps step with the others: it weighs nothing.
        tokens = 0 if is_filler(batch) else (tgt_output != self.pad_token_id).sum()
        hooks = type(self).compute_loss, type(self).compute_nll
        if hooks == (Seq2SeqTransformer.compute_loss, Seq2SeqTransformer.compute_nll):
            # Both hooks are the fused loss: one pass over the vocabulary gives both values.
            loss, nll = self.criterion(states, self.transformer.generator.weight, tgt_output, return_nll=True)
        else:  # an override decides its value
            loss, nll = self.compute_loss(states, tgt_output), self.compute_nll(states, tgt_output)
        # Token-weighted means, synced across processes by torchmetrics: a corpus-level value.
        self.eval_loss.update(loss, weight=tokens)
        self.eval_nll.update(nll, weight=tokens)

    def _log_evaluation(self, stage: str) -> None:
        loss, nll = self.eval_loss.compute(), self.eval_nll.compute()
        self.eval_loss.reset()
        self.eval_nll.reset()
        self.log_dict({f"{stage}/loss": loss, f"{stage}/nll": nll, f"{stage}/ppl": nll.exp()}, prog_bar=True)
