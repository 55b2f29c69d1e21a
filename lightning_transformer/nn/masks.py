"""Attention masks as pure functions.

One convention throughout: masks are boolean and ``True`` means *may attend*. They broadcast
against attention scores of shape ``(batch, heads, query_len, key_len)`` and go to
``F.scaled_dot_product_attention`` unchanged, so no ``-1e9`` fill ever meets a float16 tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor


def create_padding_mask(seq: Tensor, pad_token_id: int = 0) -> Tensor:
    """Mask out padding keys.

    Args:
        seq: token ids ``(batch, seq_len)``.
        pad_token_id: id of the padding token.

    Returns:
        ``(batch, 1, 1, seq_len)`` bool, ``True`` where ``seq`` is not padding. Used for encoder
        self-attention and, built from the source, for decoder cross-attention.
    """
    return (seq != pad_token_id)[:, None, None, :]


def create_causal_mask(seq_len: int, device: torch.device | str | None = None) -> Tensor:
    """Let position ``i`` attend to positions ``j <= i`` only.

    Returns:
        ``(seq_len, seq_len)`` bool, lower-triangular (diagonal included).
    """
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()


def create_combined_mask(tgt_seq: Tensor, pad_token_id: int = 0) -> Tensor:
    """Padding AND causal mask for decoder self-attention.

    Args:
        tgt_seq: target token ids ``(batch, tgt_len)``.
        pad_token_id: id of the padding token.

    Returns:
        ``(batch, 1, tgt_len, tgt_len)`` bool: ``[b, 0, i, j]`` is ``True`` iff ``j <= i`` and
        ``tgt_seq[b, j]`` is not padding.
    """
    causal = create_causal_mask(tgt_seq.size(1), device=tgt_seq.device)
    return create_padding_mask(tgt_seq, pad_token_id) & causal
