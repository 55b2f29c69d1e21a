"""The encoder-decoder network as a plain ``nn.Module``, usable without a Trainer."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .layers import DecoderLayer, Embeddings, EncoderLayer


def check_dropouts(**rates: float) -> None:
    """Refuse a dropout rate outside ``[0, 1)``, by its argument name."""
    for name, rate in rates.items():
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {rate}.")


def init_weights(network: nn.Module, pad_token_id: int) -> None:
    """Xavier-uniform linear weights, zero biases, and ``N(0, d^-1/2)`` embeddings with a zero padding row."""
    for module in network.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            # N(0, d^-1/2) times the sqrt(d) scale gives unit-variance inputs (fairseq's choice).
            nn.init.normal_(module.weight, std=module.embedding_dim**-0.5)
            nn.init.zeros_(module.weight[pad_token_id])


def run_layer(layer: nn.Module, checkpointed: bool, *args, **kwargs) -> Tensor:
    """``layer(*args, **kwargs)``, recomputed in backward instead of storing activations when ``checkpointed``.

    Only while gradients are recorded and without a decoding cache, which recomputation would update twice.
    """
    if checkpointed and torch.is_grad_enabled() and kwargs.get("cache") is None:
        # Non-reentrant checkpointing replays dropout with the saved RNG state: same values, same grads.
        return checkpoint(layer, *args, use_reentrant=False, **kwargs)
    return layer(*args, **kwargs)


class Transformer(nn.Module):
    """Encoder-decoder Transformer of "Attention Is All You Need".

    Args:
        src_vocab_size: source vocabulary size.
        tgt_vocab_size: target vocabulary size.
        d_model: model width.
        nhead: attention heads per layer.
        num_encoder_layers: encoder depth.
        num_decoder_layers: decoder depth.
        dim_feedforward: inner width of the position-wise feed-forward layers.
        dropout: dropout on embeddings and on every sub-layer output before the residual add.
        attention_dropout: dropout on attention probabilities.
        activation_dropout: dropout after the feed-forward ReLU.
        norm_first: pre-norm layers (LayerNorm before each sub-layer, plus a final one) instead of
            the paper's post-norm.
        share_embeddings: one embedding table for source and target (joint vocabulary required).
        tie_output_embeddings: the output projection reuses the target embedding table.
        pad_token_id: padding id; its embedding row stays zero.
        max_len: longest sequence the positional table covers.
        activation_checkpointing: in training, keep only each layer's input and recompute the
            layer in backward (less activation memory for about one extra forward).
    """

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
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
        pad_token_id: int = 0,
        max_len: int = 1024,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if share_embeddings and src_vocab_size != tgt_vocab_size:
            raise ValueError(
                f"share_embeddings needs one joint vocabulary, got src_vocab_size={src_vocab_size} and "
                f"tgt_vocab_size={tgt_vocab_size}; train a joint tokenizer or set share_embeddings=False."
            )
        check_dropouts(dropout=dropout, attention_dropout=attention_dropout, activation_dropout=activation_dropout)
        tgt_table = nn.Embedding(tgt_vocab_size, d_model, padding_idx=pad_token_id)
        src_table = tgt_table if share_embeddings else nn.Embedding(src_vocab_size, d_model, padding_idx=pad_token_id)
        self.src_embed = Embeddings(src_table, max_len, dropout)
        self.tgt_embed = Embeddings(tgt_table, max_len, dropout)
        layer_args = (d_model, nhead, dim_feedforward, dropout, attention_dropout, activation_dropout, norm_first)
        self.encoder_layers = nn.ModuleList(EncoderLayer(*layer_args) for _ in range(num_encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(*layer_args) for _ in range(num_decoder_layers))
        # Pre-norm leaves the residual stream unnormalised; post-norm layers already end in a LayerNorm.
        self.encoder_norm = nn.LayerNorm(d_model) if norm_first else nn.Identity()
        self.decoder_norm = nn.LayerNorm(d_model) if norm_first else nn.Identity()
        self.generator = nn.Linear(d_model, tgt_vocab_size, bias=False)
        self.activation_checkpointing = activation_checkpointing
        init_weights(self, pad_token_id)
        if tie_output_embeddings:
            self.generator.weight = tgt_table.weight

    def encode(self, src: Tensor, src_mask: Tensor | None) -> Tensor:
        """Source ids ``(B, S)`` and mask ``(B, 1, 1, S)`` -> memory ``(B, S, D)``."""
        x = self.src_embed(src)
        for layer in self.encoder_layers:
            x = self._run_layer(layer, x, src_mask)
        return self.encoder_norm(x)

    def _run_layer(self, layer: nn.Module, *args, **kwargs) -> Tensor:
        return run_layer(layer, self.activation_checkpointing and self.training, *args, **kwargs)

    def init_cache(self) -> list[dict[str, dict[str, Tensor]]]:
        """Empty incremental-decoding state: per decoder layer, self- and cross-attention keys/values."""
        return [{"self": {}, "cross": {}} for _ in self.decoder_layers]

    def decode_states(self, tgt: Tensor, memory: Tensor, tgt_mask: Tensor | None, memory_mask: Tensor | None,
                      cache: list[dict] | None = None) -> Tensor:
        """Target prefix ids ``(B, T)`` over ``memory`` ``(B', S, D)`` -> decoder output ``(B, T, D)``.

        ``B'`` is ``B`` or divides it: then each memory row (and ``memory_mask`` row) serves ``B / B'``
        consecutive target rows, as the beams of one sentence in beam search.

        With ``cache`` (from :meth:`init_cache`, updated in place) ``tgt`` holds only the positions
        after those already cached, so each step of autoregressive decoding costs one position.
        """
        self_cached = cache[0]["self"].get("k") if cache else None
        x = self.tgt_embed(tgt, offset=0 if self_cached is None else self_cached.size(2))
        for i, layer in enumerate(self.decoder_layers):
            x = self._run_layer(layer, x, memory, tgt_mask, memory_mask, cache=cache[i] if cache is not None else None)
        return self.decoder_norm(x)

    def decode(self, tgt: Tensor, memory: Tensor, tgt_mask: Tensor | None, memory_mask: Tensor | None,
               cache: list[dict] | None = None) -> Tensor:
        """Logits ``(B, T, V_tgt)``: :meth:`decode_states` followed by the output projection."""
        return self.generator(self.decode_states(tgt, memory, tgt_mask, memory_mask, cache))

    def forward(self, src: Tensor, tgt: Tensor, src_mask: Tensor | None, tgt_mask: Tensor | None) -> Tensor:
        """Logits ``(B, T, V_tgt)`` for target prefix ``tgt`` ``(B, T)`` given source ``src`` ``(B, S)``."""
        return self.decode(tgt, self.encode(src, src_mask), tgt_mask, src_mask)
