"""Forced decoding: the log-probability an encoder-decoder gives each token of a known translation.

What fairseq's ``--score-reference``, ``marian-scorer`` and ``sockeye-score`` report, through the same
hooks as training (``make_masks``, ``encode``, ``decode``), so a research subclass scores as it trains.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .decoding import decoding_mode


@decoding_mode
def score_ids(model, src: Tensor, tgt: Tensor, pad_token_id: int = 0) -> list[list[float]]:
    """Teacher-forced log-probability of every target token after BOS, the closing EOS last.

    Args:
        model: anything with ``make_masks(src, tgt_input)``, ``encode(src, src_mask)`` and
            ``decode(tgt_input, memory, tgt_mask, src_mask) -> logits`` (e.g. ``Seq2SeqTransformer``).
        src: source ids ending in EOS ``(B, S)``, padded.
        tgt: target ids ``BOS ... EOS`` ``(B, T)``, padded: a training batch's layout.

    Returns:
        Per sentence, one log-probability per non-pad token of ``tgt[:, 1:]``, in float32 (float64
        for a float64 model).
    """
    tgt_input, tgt_output = tgt[:, :-1], tgt[:, 1:]
    src_mask, tgt_mask = model.make_masks(src, tgt_input)
    logits = model.decode(tgt_input, model.encode(src, src_mask), tgt_mask, src_mask)  # (B, T-1, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    # log_softmax gathered at the targets, without a second (B, T-1, V) tensor of log-probabilities.
    log_probs = logits.gather(-1, tgt_output[..., None]).squeeze(-1) - logits.logsumexp(-1)  # (B, T-1)
    lengths = (tgt_output != pad_token_id).sum(dim=1).tolist()
    return [row[:length] for row, length in zip(log_probs.tolist(), lengths)]
