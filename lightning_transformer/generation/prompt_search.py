"""Beam search from prompts for a decoder-only model: :func:`~.decoding.search_beams` after a prefill.

The model is anything with ``forward(ids, cache=None) -> logits (B, T, V)``, ``init_cache()``,
``reorder_cache(cache, order)``, ``pad_token_id`` and ``max_len`` (e.g.
:class:`~lightning_transformer.nn.causal.CausalTransformer`). Prompts of equal length are searched
together: each one's tokens but the last are fed once, the key/value cache is expanded to ``K``
beams per prompt, and the search starts by feeding the last prompt token. So a prompt gets the
positions it would get alone, hence the same hypotheses whatever its padding and batch.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from .decoding import Hypothesis, decoding_mode, log_softmax, search_beams
from .sampling import prepare_prompts


@decoding_mode
def prompt_beam_search(
    model,
    prompts: Tensor,
    beam_size: int = 4,
    max_new_tokens: int = 64,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
    alpha: float = 0.6,
    penalty_style: Literal["gnmt", "power"] = "gnmt",
    nbest: int = 1,
) -> list[list[Hypothesis]]:
    """Beam search continuing each prompt; the hypotheses are scored as in :func:`~.decoding.beam_search`.

    Args:
        model: see the module docstring; put it in ``eval()`` mode first.
        prompts: ``(B, P)`` token ids, left- or right-padded with ``model.pad_token_id``.
        beam_size: live hypotheses per prompt.
        max_new_tokens: most generated tokens per prompt, EOS included; fewer where prompt and
            continuation would pass ``model.max_len`` tokens. The last one allowed is EOS.
        alpha: length-penalty exponent over the continuation's length (EOS included);
            ``penalty_style`` picks the formula.
        nbest: hypotheses returned per prompt, best first.

    Returns:
        For each prompt, its ``nbest`` best :class:`~.decoding.Hypothesis`, whose tokens are the
        continuation without EOS; an empty list where no token fits (``max_new_tokens=0``, or a
        prompt of ``max_len`` tokens).
    """
    tokens, lengths = prepare_prompts(model, prompts, max_new_tokens)
    limits = (model.max_len - lengths).clamp(max=max_new_tokens)  # (B,)
    results: list[list[Hypothesis]] = [[] for _ in range(tokens.size(0))]
    for length in lengths.unique().tolist():
        rows = ((lengths == length) & (limits > 0)).nonzero().squeeze(1)
        if rows.numel():
            group = tokens[rows, :length]  # (G, length): no padding, so positions start at 0 in every row
            hyps = _search_group(model, group, limits[rows], beam_size, nbest, bos_token_id, eos_token_id, alpha,
                                 penalty_style)
            for row, row_hyps in zip(rows.tolist(), hyps):
                results[row] = row_hyps
    return results


def _search_group(model, group: Tensor, limits: Tensor, beam_size: int, nbest: int, bos_token_id: int,
                  eos_token_id: int, alpha: float, penalty_style: Literal["gnmt", "power"]) -> list[list[Hypothesis]]:
    """Search prompts ``(G, P)`` of one length: prefill ``P - 1`` tokens once, then ``G * K`` beams."""
    cache = model.init_cache()
    if group.size(1) > 1:
        model(group[:, :-1], cache=cache)
    model.reorder_cache(cache, torch.arange(group.size(0), device=group.device).repeat_interleave(beam_size))

    def step(last: Tensor) -> Tensor:
        return log_softmax(model(last, cache=cache)[:, -1])

    def reorder(order: Tensor, rows: Tensor | None) -> None:
        model.reorder_cache(cache, order)  # every cached tensor is per beam: ``order`` alone drops finished rows

    return search_beams(step, reorder, group[:, -1], limits, beam_size, nbest, model.pad_token_id, bos_token_id,
                        eos_token_id, alpha, penalty_style)


def beam_generate(model, prompts: Tensor, beam_size: int, max_new_tokens: int, bos_token_id: int,
                  eos_token_id: int, alpha: float = 0.6) -> Tensor:
    """The best beam per prompt in :func:`~.sampling.generate`'s format.

    Returns:
        ``(B, L)`` ids: each row's prompt, then its best continuation and EOS, then ``model.pad_token_id``.
    """
    tokens, lengths = prepare_prompts(model, prompts, max_new_tokens)
    best = prompt_beam_search(model, tokens, beam_size, max_new_tokens, bos_token_id, eos_token_id, alpha)
    rows = [torch.tensor(prompt[:n] + (hyps[0].tokens + [eos_token_id] if hyps else []))
            for prompt, n, hyps in zip(tokens.tolist(), lengths.tolist(), best)]
    return pad_sequence(rows, batch_first=True, padding_value=model.pad_token_id).to(prompts.device)
