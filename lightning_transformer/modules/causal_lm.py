"""``CausalLMTransformer``: the LightningModule that trains a decoder-only :class:`CausalTransformer`.

Each step reads like the recipe: shift the sequence by one, build the padding+causal mask, forward
(:meth:`teacher_force` here), then the label-smoothed loss and logging of :class:`TokenLevelModule`,
shared with :class:`Seq2SeqTransformer`. Research code overrides one hook (``make_mask``,
``shift_targets``, ``decode_states``, ``project``, ``compute_loss``, ``unpack_batch``); each holds in
training, evaluation and generation.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import takewhile
from typing import Literal

import torch
from torch import Tensor, nn

from ..data.batch import is_filler, unpack_lines
from ..generation.decoding import Hypothesis
from ..generation.prompt_search import beam_generate, prompt_beam_search
from ..generation.sampling import generate
from ..nn.causal import Cache, CausalTransformer
from .base import TokenLevelModule


class CausalLMTransformer(TokenLevelModule):
    """Decoder-only (GPT-style) Transformer language model.

    Args:
        vocab_size: vocabulary size (the CLI links it to the data module's).
        d_model: model width.
        nhead: attention heads.
        num_layers: decoder layers.
        dim_feedforward: feed-forward inner width.
        dropout: residual and embedding dropout.
        attention_dropout: dropout on attention probabilities.
        activation_dropout: dropout after the feed-forward ReLU.
        norm_first: pre-norm layers and a final LayerNorm instead of the paper's post-norm.
        tie_output_embeddings: the output projection reuses the token embeddings.
        max_len: longest sequence, prompt and continuation together, in tokens.
        pad_token_id: padding id, ignored by the loss and masked in attention.
        bos_token_id: id that starts every sequence (and every prompt).
        eos_token_id: id that ends a sequence; generation stops there.
        label_smoothing: epsilon of the label-smoothed loss.
        scheduler: ``noam`` or ``cosine`` (linear warm-up, cosine decay to ``min_lr_ratio * lr``).
        warmup_steps: warm-up length in optimizer steps.
        lr_factor: Noam multiplier; peak lr is ``lr_factor * (d_model * warmup_steps)^-0.5``.
        lr: peak learning rate of the cosine schedule.
        min_lr_ratio: cosine floor as a fraction of ``lr``.
        total_steps: cosine decay length; defaults to the Trainer's estimated stepping batches.
        betas: Adam betas.
        eps: Adam epsilon.
        weight_decay: decoupled (AdamW) weight decay of the weight matrices and embeddings; 0 is the paper's Adam.
        max_new_tokens: default number of tokens :meth:`generate` adds, EOS included.
        temperature: default sampling temperature of :meth:`generate`; 0 is greedy.
        top_k: default top-k filter of :meth:`generate` (None: off).
        top_p: default nucleus filter of :meth:`generate` (None: off).
        beam_size: default beam width of :meth:`generate` and ``predict``; 1 is off (decode by
            ``temperature``, ``top_k``, ``top_p``).
        length_penalty: GNMT length-penalty exponent alpha of beam search (0 ranks by log-probability).
        activation_checkpointing: recompute each layer in backward instead of storing its activations.
    """

    def __init__(
        self,
        vocab_size: int = 8000,
        d_model: int = 512,
        nhead: int = 8,
        num_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        norm_first: bool = False,
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
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        beam_size: int = 1,
        length_penalty: float = 0.6,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__(vocab_size, pad_token_id, label_smoothing)
        if warmup_steps <= 0:
            raise ValueError(f"warmup_steps must be positive, got {warmup_steps}; e.g. 100 for a short cosine run.")
        self.save_hyperparameters()
        self.d_model, self.vocab_size, self.max_len = d_model, vocab_size, max_len
        self.transformer = CausalTransformer(
            vocab_size, d_model, nhead, num_layers, dim_feedforward, dropout, attention_dropout,
            activation_dropout, norm_first, tie_output_embeddings, pad_token_id, max_len, activation_checkpointing,
        )

    # ----- research hooks ---------------------------------------------------------------------
    unpack_batch = staticmethod(unpack_lines)  # a language model's batch holds one sequence per row

    def make_mask(self, ids: Tensor, cache: Cache | None = None) -> Tensor:
        """Padding and causal mask ``(B, 1, T, P + T)`` for new ids ``(B, T)`` after ``P`` cached positions."""
        return self.transformer.make_mask(ids, cache)

    def shift_targets(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher forcing: ``ids[:, :-1]`` goes in, ``ids[:, 1:]`` is predicted."""
        return ids[:, :-1], ids[:, 1:]

    def decode_states(self, ids: Tensor, mask: Tensor, cache: Cache | None = None) -> Tensor:
        """Ids ``(B, T)`` -> final hidden states ``(B, T, D)``; with ``cache``, ``ids`` are only the new positions."""
        return self.transformer.states(ids, mask, cache)

    def init_cache(self) -> Cache:
        """Empty incremental-decoding state for :meth:`forward`."""
        return self.transformer.init_cache()

    def reorder_cache(self, cache: Cache, order: Tensor) -> None:
        """Make cached row ``i`` the old row ``order[i]`` (beam search), in place."""
        self.transformer.reorder_cache(cache, order)

    def output_projection(self) -> nn.Linear:
        return self.transformer.generator

    # ----- forward and steps ------------------------------------------------------------------
    def forward(self, ids: Tensor, mask: Tensor | None = None, cache: Cache | None = None) -> Tensor:
        """Next-token logits ``(B, T, V)``; the mask is built with :meth:`make_mask` when not given."""
        if mask is None:
            mask = self.make_mask(ids, cache)
        return self.project(self.decode_states(ids, mask, cache))

    def teacher_force(self, batch) -> tuple[Tensor, Tensor]:
        """Shift the sequence by one, build the mask, decode: ``(states (B, T, D), targets (B, T))``."""
        inputs, targets = self.shift_targets(self.unpack_batch(batch))
        return self.decode_states(inputs, self.make_mask(inputs)), targets

    def predict_step(self, batch, batch_idx: int) -> dict[str, list]:
        """Continue each row, a line ``<s> ... </s>`` whose EOS is dropped, with :meth:`generate`'s defaults.

        Returns ``{"tokens": continuation ids per row without BOS/EOS/padding, "index": the batch's, if any}``.
        """
        if is_filler(batch):
            return {"tokens": [], "index": []}
        lines = self.unpack_batch(batch)
        hp = self.hparams
        prompts = lines.masked_fill(lines == hp.eos_token_id, self.pad_token_id)
        lengths = (prompts != self.pad_token_id).sum(1).tolist()
        # generate packs each prompt to the front, so its continuation starts at the prompt's length.
        tokens = [list(takewhile(lambda t: t not in (hp.eos_token_id, self.pad_token_id), row[n:]))
                  for row, n in zip(self.generate(prompts).tolist(), lengths)]
        index = batch["index"].tolist() if isinstance(batch, Mapping) and "index" in batch else None
        return {"tokens": tokens, "index": index}

    def generate(self, prompts: Tensor, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True, beam_size: int | None = None, length_penalty: float | None = None) -> Tensor:
        """Continue prompts ``(B, P)`` (each starting with BOS, padded with ``pad_token_id``).

        Arguments left ``None`` take this model's hyperparameters; ``temperature=0`` is greedy, and
        ``beam_size > 1`` keeps each prompt's best beam (:meth:`beam_search`), which takes no
        sampling argument. Call ``eval()`` first for deterministic output. Returns ``(B, L)`` ids:
        prompt, continuation (ending in EOS unless cut by the length limit), padding.
        """
        hp = self.hparams
        max_new_tokens = hp.max_new_tokens if max_new_tokens is None else max_new_tokens
        beam_size = hp.beam_size if beam_size is None else beam_size
        if beam_size > 1:
            if (temperature, top_k, top_p) != (None, None, None):
                raise ValueError(f"beam search (beam_size={beam_size}) does not sample, so it takes no temperature, "
                                 "top_k or top_p; drop them, or set beam_size=1 (--beam-size 1) to sample.")
            alpha = hp.length_penalty if length_penalty is None else length_penalty
            return beam_generate(self, prompts, beam_size, max_new_tokens, hp.bos_token_id, hp.eos_token_id, alpha)
        return generate(
            self, prompts, max_new_tokens, hp.eos_token_id, hp.temperature if temperature is None else temperature,
            hp.top_k if top_k is None else top_k, hp.top_p if top_p is None else top_p, generator, use_cache,
        )

    def beam_search(self, prompts: Tensor, beam_size: int | None = None, nbest: int = 1,
                    max_new_tokens: int | None = None, length_penalty: float | None = None) -> list[list[Hypothesis]]:
        """The ``nbest`` best continuations of each prompt ``(B, P)``, best first; tokens exclude the prompt and EOS.

        Arguments left ``None`` take this model's hyperparameters (``beam_size`` at least ``nbest``).
        Each :class:`Hypothesis` scores ``log P(continuation, EOS | prompt) / length_penalty``; see
        :func:`~lightning_transformer.generation.prompt_search.prompt_beam_search`.
        """
        hp = self.hparams
        return prompt_beam_search(
            self, prompts, max(hp.beam_size, nbest) if beam_size is None else beam_size,
            hp.max_new_tokens if max_new_tokens is None else max_new_tokens, hp.bos_token_id, hp.eos_token_id,
            hp.length_penalty if length_penalty is None else length_penalty, nbest=nbest,
        )
