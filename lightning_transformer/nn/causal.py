"""The decoder-only (GPT-style) network as a plain ``nn.Module``, usable without a Trainer.

Tensor shapes: ``B`` batch, ``T`` new positions, ``P`` cached positions, ``D`` model width, ``V``
vocabulary. Masks are boolean with ``True`` = may attend (see :mod:`lightning_transformer.nn.masks`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layers import Embeddings, EncoderLayer
from .masks import create_padding_mask
from .transformer import check_dropouts, init_weights, run_layer

Cache = dict[str, object]


class CausalTransformer(nn.Module):
    """Decoder-only Transformer: the paper's decoder without cross-attention, a causal language model.

    Args:
        vocab_size: vocabulary size ``V``.
        d_model: model width.
        nhead: attention heads per layer.
        num_layers: depth.
        dim_feedforward: inner width of the position-wise feed-forward layers.
        dropout: dropout on embeddings and on every sub-layer output before the residual add.
        attention_dropout: dropout on attention probabilities.
        activation_dropout: dropout after the feed-forward ReLU.
        norm_first: pre-norm layers plus a final LayerNorm, instead of the paper's post-norm.
        tie_output_embeddings: the output projection (``generator``) reuses the embedding table.
        pad_token_id: padding id; its embedding row starts at zero and padded keys are masked.
        max_len: longest sequence (prompt and continuation together) the positional table covers.
        activation_checkpointing: in training, keep only each layer's input and recompute the
            layer in backward (less activation memory for about one extra forward).
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 512,
        nhead: int = 8,
        num_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        norm_first: bool = False,
        tie_output_embeddings: bool = True,
        pad_token_id: int = 0,
        max_len: int = 1024,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        check_dropouts(dropout=dropout, attention_dropout=attention_dropout, activation_dropout=activation_dropout)
        if not 0 <= pad_token_id < vocab_size:
            raise ValueError(f"pad_token_id={pad_token_id} is outside the vocabulary [0, {vocab_size}); "
                             "use the tokenizer's pad id (0).")
        table = nn.Embedding(vocab_size, d_model, padding_idx=pad_token_id)
        self.embed = Embeddings(table, max_len, dropout)
        layer_args = (d_model, nhead, dim_feedforward, dropout, attention_dropout, activation_dropout, norm_first)
        # An encoder layer under a causal mask is a decoder-only layer.
        self.layers = nn.ModuleList(EncoderLayer(*layer_args) for _ in range(num_layers))
        # Pre-norm leaves the residual stream unnormalised; post-norm layers already end in a LayerNorm.
        self.final_norm = nn.LayerNorm(d_model) if norm_first else nn.Identity()
        self.generator = nn.Linear(d_model, vocab_size, bias=False)
        self.pad_token_id, self.max_len = pad_token_id, max_len
        self.activation_checkpointing = activation_checkpointing
        init_weights(self, pad_token_id)
        if tie_output_embeddings:
            self.generator.weight = table.weight

    def init_cache(self) -> Cache:
        """Empty incremental-decoding state: per layer keys/values, and which cached positions are not padding."""
        return {"layers": [{} for _ in self.layers], "keep": None}

    def reorder_cache(self, cache: Cache, order: Tensor) -> None:
        """Make cached row ``i`` the old row ``order[i]``, in place; ``order`` ``(B',)`` may repeat rows (beams)."""
        for layer in cache["layers"]:
            for name, state in layer.items():
                layer[name] = state.index_select(0, order)
        if cache["keep"] is not None:
            cache["keep"] = cache["keep"].index_select(0, order)

    def cached_length(self, cache: Cache | None) -> int:
        """Number of positions ``P`` already in ``cache`` (0 without one)."""
        keep = cache["keep"] if cache is not None else None
        return 0 if keep is None else keep.size(1)

    def make_mask(self, ids: Tensor, cache: Cache | None = None) -> Tensor:
        """Padding and causal mask ``(B, 1, T, P + T)`` for new ids ``(B, T)`` after ``P`` cached positions.

        ``[b, 0, i, j]`` is ``True`` iff key ``j`` is at or before query ``P + i`` and not padding;
        without a cache this is :func:`~lightning_transformer.nn.masks.create_combined_mask`.
        """
        past = self.cached_length(cache)
        keep = create_padding_mask(ids, self.pad_token_id)
        if past:
            keep = torch.cat([cache["keep"][:, None, None, :], keep], dim=-1)
        causal = torch.ones(ids.size(1), past + ids.size(1), dtype=torch.bool, device=ids.device).tril(past)
        return keep & causal

    def states(self, ids: Tensor, mask: Tensor | None = None, cache: Cache | None = None) -> Tensor:
        """Token ids ``(B, T)`` -> final hidden states ``(B, T, D)``, before the output projection.

        Args:
            ids: the whole sequence, or with ``cache`` only the positions after the cached ones.
            mask: bool ``(B, 1, T, P + T)``, True = may attend; default :meth:`make_mask`.
            cache: from :meth:`init_cache`, updated in place, so each generated token costs one position.
        """
        if ids.dim() != 2:
            raise ValueError(f"ids must be (batch, length) token ids, got shape {tuple(ids.shape)}; add a batch "
                             "dimension with ids[None].")
        past = self.cached_length(cache)
        if past + ids.size(1) > self.max_len:
            raise ValueError(f"{past} cached plus {ids.size(1)} new positions exceed the model's "
                             f"max_len={self.max_len}; shorten the sequence (data max_length, generation "
                             "max_new_tokens) or raise max_len.")
        if mask is None:
            mask = self.make_mask(ids, cache)
        x = self.embed(ids, offset=past)
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache["layers"][i]
            x = run_layer(layer, self.activation_checkpointing and self.training, x, mask, cache=layer_cache)
        if cache is not None:
            new_keep = ids != self.pad_token_id
            cache["keep"] = new_keep if cache["keep"] is None else torch.cat([cache["keep"], new_keep], dim=1)
        return self.final_norm(x)

    def forward(self, ids: Tensor, mask: Tensor | None = None, cache: Cache | None = None) -> Tensor:
        """Next-token logits ``(B, T, V)``: :meth:`states` followed by ``generator``."""
        return self.generator(self.states(ids, mask, cache))
