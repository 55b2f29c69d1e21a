"""Autoregressive decoding over a model's ``encode`` / ``decode`` hooks."""

from __future__ import annotations

import torch
from torch import Tensor

from .masks import create_combined_mask, create_padding_mask


@torch.no_grad()
def greedy_decode(model, src: Tensor, max_len: int, pad_token_id: int, bos_token_id: int,
                  eos_token_id: int) -> list[list[int]]:
    """Pick the most likely next token until every sentence has emitted EOS or ``max_len`` tokens.

    Args:
        model: anything with ``encode(src, src_mask)`` and ``decode(tgt, memory, tgt_mask, src_mask)``
            returning logits ``(B, T, V)``, e.g. :class:`~lightning_transformer.Seq2SeqTransformer`.
        src: source ids ``(B, S)``.
        max_len: most tokens generated per sentence, EOS included.

    Returns:
        One list of token ids per sentence, without BOS, EOS or padding.
    """
    src_mask = create_padding_mask(src, pad_token_id)
    memory = model.encode(src, src_mask)
    ys = torch.full((src.size(0), 1), bos_token_id, dtype=torch.long, device=src.device)
    finished = torch.zeros(src.size(0), dtype=torch.bool, device=src.device)
    for _ in range(max_len):
        logits = model.decode(ys, memory, create_combined_mask(ys, pad_token_id), src_mask)[:, -1]
        next_token = logits.argmax(dim=-1).masked_fill(finished, pad_token_id)
        ys = torch.cat([ys, next_token[:, None]], dim=1)
        finished |= next_token == eos_token_id
        if finished.all():
            break
    hypotheses = []
    for row in ys[:, 1:].tolist():
        hypotheses.append(row[: row.index(eos_token_id)] if eos_token_id in row else row)
    return hypotheses
