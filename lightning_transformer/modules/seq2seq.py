"""``Seq2SeqTransformer``: the LightningModule that trains :class:`Transformer` the paper's way.

Each step reads like the recipe: shift the target right, build masks, forward (:meth:`teacher_force`
here), then the label-smoothed loss and logging of :class:`TokenLevelModule`. Research code overrides
one hook (``make_masks``, ``shift_targets``, ``encode``, ``decode_states``, ``project``,
``compute_loss``, ``unpack_batch``) instead of copying a step; each holds in training, evaluation
and decoding.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from torch import Tensor, nn

from ..data.batch import is_filler
from ..generation.decoding import beam_search
from ..nn.masks import create_combined_mask, create_padding_mask
from ..nn.transformer import Transformer
from .base import TokenLevelModule


class Seq2SeqTransformer(TokenLevelModule):
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
        weight_decay: decoupled (AdamW) weight decay of the weight matrices and embeddings; 0 is the paper's Adam.
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
        super().__init__(tgt_vocab_size, pad_token_id, label_smoothing)
        if warmup_steps <= 0:
            raise ValueError(f"warmup_steps must be positive, got {warmup_steps}; the paper uses 4000.")
        self.save_hyperparameters()
        self.d_model, self.tgt_vocab_size = d_model, tgt_vocab_size
        self.transformer = Transformer(
            src_vocab_size, tgt_vocab_size, d_model, nhead, num_encoder_layers, num_decoder_layers,
            dim_feedforward, dropout, attention_dropout, activation_dropout, norm_first,
            share_embeddings, tie_output_embeddings, pad_token_id, max_len, activation_checkpointing,
        )

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

    def decode(self, tgt_input: Tensor, memory: Tensor, tgt_mask: Tensor | None, src_mask: Tensor | None,
               cache: list[dict] | None = None) -> Tensor:
        """Logits ``(B, T, V)``: :meth:`project` of :meth:`decode_states` (what the searches call)."""
        return self.project(self.decode_states(tgt_input, memory, tgt_mask, src_mask, cache))

    def init_cache(self) -> list[dict]:
        """Empty incremental-decoding state for :meth:`decode`."""
        return self.transformer.init_cache()

    def output_projection(self) -> nn.Linear:
        return self.transformer.generator

    # ----- forward and steps ------------------------------------------------------------------
    def forward(self, src: Tensor, tgt_input: Tensor, src_mask: Tensor | None = None,
                tgt_mask: Tensor | None = None) -> Tensor:
        """Logits ``(B, T, tgt_vocab)``; masks are built with :meth:`make_masks` when not given."""
        if src_mask is None or tgt_mask is None:
            default_src_mask, default_tgt_mask = self.make_masks(src, tgt_input)
            src_mask = default_src_mask if src_mask is None else src_mask
            tgt_mask = default_tgt_mask if tgt_mask is None else tgt_mask
        return self.decode(tgt_input, self.encode(src, src_mask), tgt_mask, src_mask)

    def teacher_force(self, batch) -> tuple[Tensor, Tensor]:
        """Shift the target right, build masks, encode, decode: ``(states (B, T, D), tgt_output (B, T))``."""
        src, tgt = self.unpack_batch(batch)
        tgt_input, tgt_output = self.shift_targets(tgt)
        src_mask, tgt_mask = self.make_masks(src, tgt_input)
        memory = self.encode(src, src_mask)
        return self.decode_states(tgt_input, memory, tgt_mask, src_mask), tgt_output

    def predict_step(self, batch, batch_idx: int) -> dict[str, list]:
        """Beam search: ``{"tokens": ids without BOS/EOS/padding per sentence, "index": the batch's, if any}``."""
        if is_filler(batch):
            return {"tokens": [], "index": []}
        src = batch if isinstance(batch, Tensor) else self.unpack_batch(batch, need_target=False)[0]
        index = batch["index"].tolist() if isinstance(batch, Mapping) and "index" in batch else None
        return {"tokens": [hyps[0].tokens for hyps in self.translate_ids(src)], "index": index}

    def translate_ids(self, src: Tensor, beam_size: int | None = None, length_penalty: float | None = None,
                      nbest: int = 1) -> list[list]:
        """Beam search over source ids ``(B, S)``: each sentence's ``nbest`` best hypotheses; arguments left
        ``None`` take this model's hyperparameters."""
        hp = self.hparams
        alpha = hp.length_penalty if length_penalty is None else length_penalty
        return beam_search(self, src, beam_size or hp.beam_size, hp.max_decode_len_a, hp.max_decode_len_b,
                           self.pad_token_id, hp.bos_token_id, hp.eos_token_id, alpha, nbest=nbest,
                           max_positions=hp.max_len)
