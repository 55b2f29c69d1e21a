"""Autoregressive decoding, greedy (or sampled) and beam search, over a model's ``encode`` / ``decode`` hooks.

The model is anything with ``encode(src, src_mask) -> memory``, ``init_cache()`` and
``decode(tgt, memory, tgt_mask, src_mask, cache) -> logits`` (e.g. ``Seq2SeqTransformer``); its
``make_masks(src, tgt_input)``, if it has one, builds the source mask. Both
decoders feed one new token a step through the incremental key/value cache; cross-attention keys
and values are projected once per sentence, and beam search hands ``decode`` one memory row per
sentence for its ``beam_size`` consecutive hypotheses. The beam search loop itself, :func:`search_beams`,
sees the model only through a step and a cache reorder, so the decoder-only search from prompts
(:mod:`.prompt_search`) shares it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..nn.masks import create_padding_mask
from .sampling import sample_next


@dataclass
class Hypothesis:
    """A finished translation: token ids (no BOS/EOS/padding), its length-normalised score and log-probability."""

    tokens: list[int]
    score: float
    log_prob: float


def length_penalty(length: int, alpha: float, style: Literal["gnmt", "power"] = "gnmt") -> float:
    """Divisor of a hypothesis' log-probability: GNMT's ``((5 + L) / 6)^alpha`` or ``L^alpha``.

    ``L`` counts the generated tokens including EOS; ``alpha = 0`` ranks by log-probability.
    """
    if style == "gnmt":
        return ((5.0 + length) / 6.0) ** alpha
    if style == "power":
        return float(length) ** alpha
    raise ValueError(f"length penalty style must be 'gnmt' or 'power', got {style!r}.")


def max_output_lengths(src: Tensor, pad_token_id: int, a: float, b: int, max_positions: int | None = None) -> Tensor:
    """Per-sentence limit ``a * source_length + b`` (at least 1), EOS included: ``(B,)`` long.

    ``max_positions`` (the model's positional table) caps it: the decoder is fed BOS and every
    generated token but the last, so ``max_positions`` positions allow ``max_positions`` tokens.
    """
    source_lengths = (src != pad_token_id).sum(dim=1)
    return (a * source_lengths + b).floor().long().clamp(min=1, max=max_positions)


def decoding_mode(function):
    """``no_grad``, also leaving inference mode: under ``inference_mode`` (Lightning's evaluation
    loops) autocast re-casts every weight at every step instead of caching the casts, which made
    bf16 decoding slower than float32.
    """

    @functools.wraps(function)
    def decode(*args, **kwargs):
        with torch.inference_mode(False), torch.no_grad():
            return function(*args, **kwargs)

    return decode


def _source_mask(model, src: Tensor, pad_token_id: int, bos_token_id: int) -> Tensor:
    # Through the model's hook, so a subclass's masking holds when decoding too; the target mask it
    # also returns is unused, since the cache feeds one position a step.
    if hasattr(model, "make_masks"):
        return model.make_masks(src, torch.full_like(src[:, :1], bos_token_id))[0]
    return create_padding_mask(src, pad_token_id)


def _reorder_cache(cache: list[dict], order: Tensor, rows: Tensor | None) -> None:
    for layer in cache:
        for name, state in layer.items():
            # Beams never leave their sentence, whose memory keys/values ("cross") they all share.
            index = order if name != "cross" else rows
            if index is not None:
                for key, value in state.items():
                    state[key] = value.index_select(0, index)


#: Next tokens ``(B,)`` from last-position logits ``(B, V)`` whose padding and BOS columns are ``-inf``.
Choose = Callable[[Tensor], Tensor]


def sampler(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
            generator: torch.Generator | None = None) -> Choose:
    """:func:`greedy_decode`'s ``choose`` drawing as :func:`~.sampling.sample_next` does (temperature 0: argmax)."""
    return functools.partial(sample_next, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)


@decoding_mode
def greedy_decode(model, src: Tensor, max_len: int | Tensor, pad_token_id: int, bos_token_id: int,
                  eos_token_id: int, max_positions: int | None = None, choose: Choose | None = None) -> list[list[int]]:
    """Pick one next token a step (the most likely, or ``choose``'s; never padding or BOS) until every sentence ends.

    Args:
        src: source ids ``(B, S)``.
        max_len: most tokens generated per sentence, EOS included, for all or per sentence ``(B,)``
            (e.g. :func:`max_output_lengths`): the last one is forced to EOS.
        max_positions: the model's positional table (``hparams.max_len``), which caps ``max_len``.
        choose: next-token rule, e.g. :func:`sampler`; default argmax. At a sentence's limit it sees
            every token but EOS at ``-inf``.

    Returns:
        One list of token ids per sentence, without BOS, EOS or padding.
    """
    src_mask = _source_mask(model, src, pad_token_id, bos_token_id)
    memory, cache = model.encode(src, src_mask), model.init_cache()
    ys = torch.full((src.size(0), 1), bos_token_id, dtype=torch.long, device=src.device)
    finished = torch.zeros(src.size(0), dtype=torch.bool, device=src.device)
    limits = torch.as_tensor(max_len, device=src.device).expand(src.size(0))
    limits = limits if max_positions is None else limits.clamp(max=max_positions)
    for step in range(int(limits.max()) if limits.numel() else 0):
        logits = model.decode(ys[:, -1:], memory, None, src_mask, cache)[:, -1]
        logits[:, [pad_token_id, bos_token_id]] = -math.inf
        at_limit = limits <= step + 1  # (B,): only EOS may follow
        not_eos = torch.arange(logits.size(-1), device=src.device) != eos_token_id
        logits = logits.masked_fill(at_limit[:, None] & not_eos, -math.inf)
        next_token = (logits.argmax(dim=-1) if choose is None else choose(logits)).masked_fill(finished, pad_token_id)
        ys = torch.cat([ys, next_token[:, None]], dim=1)
        finished |= next_token == eos_token_id
        if finished.all():
            break
    return [row[: row.index(eos_token_id)] if eos_token_id in row else row for row in ys[:, 1:].tolist()]


def log_softmax(logits: Tensor) -> Tensor:
    """Log-probabilities ``(..., V)`` in float32, or float64 for a float64 model (exact checks)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)


@decoding_mode
def beam_search(
    model,
    src: Tensor,
    beam_size: int = 4,
    max_len_a: float = 1.2,
    max_len_b: int = 10,
    pad_token_id: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
    alpha: float = 0.6,
    penalty_style: Literal["gnmt", "power"] = "gnmt",
    nbest: int = 1,
    max_positions: int | None = None,
) -> list[list[Hypothesis]]:
    """Batched beam search over source sentences: :func:`search_beams` with the encoder-decoder's step.

    Args:
        src: source ids ``(B, S)``.
        beam_size: live hypotheses per sentence.
        max_len_a, max_len_b: at most ``a * source_length + b`` generated tokens (EOS included).
        alpha: length-penalty exponent (the paper: 0.6); ``penalty_style`` picks the formula.
        nbest: hypotheses returned per sentence, best first.
        max_positions: the model's positional table (``hparams.max_len``), which caps the limit.

    Returns:
        For each sentence, its ``nbest`` best :class:`Hypothesis` by ``log_prob / length_penalty``.
    """
    limits = max_output_lengths(src, pad_token_id, max_len_a, max_len_b, max_positions)
    src_mask = _source_mask(model, src, pad_token_id, bos_token_id)
    # (B, S, D): the K beams of a sentence share its row; rows leave with their finished sentences.
    source = {"memory": model.encode(src, src_mask), "mask": src_mask}
    cache = model.init_cache()

    def step(last: Tensor) -> Tensor:
        return log_softmax(model.decode(last, source["memory"], None, source["mask"], cache)[:, -1])

    def reorder(order: Tensor, rows: Tensor | None) -> None:
        _reorder_cache(cache, order, rows)
        if rows is not None:
            for name, value in source.items():  # a mask that broadcasts over the batch stays as it is
                if value is not None and value.size(0) > 1:
                    source[name] = value.index_select(0, rows)

    start = torch.full((src.size(0),), bos_token_id, dtype=torch.long, device=src.device)
    return search_beams(step, reorder, start, limits, beam_size, nbest, pad_token_id, bos_token_id, eos_token_id,
                        alpha, penalty_style)


def search_beams(step, reorder, start: Tensor, limits: Tensor, beam_size: int, nbest: int, pad_token_id: int,
                 bos_token_id: int, eos_token_id: int, alpha: float,
                 penalty_style: Literal["gnmt", "power"] = "gnmt") -> list[list[Hypothesis]]:
    """The beam search loop, for any model behind ``step`` and ``reorder``; rows are sentences or prompts.

    Each step extends every live beam by every token (never padding or BOS), keeps the
    ``2 * beam_size`` best continuations per row, moves those ending in EOS and ranked within the
    top ``beam_size`` to the row's finished list, and continues with the ``beam_size`` best others.
    A row is done once it has ``beam_size`` finished hypotheses (fairseq's rule); at its length
    limit only EOS may follow. Done rows leave the batch, so later steps cost only the rows left.

    Args:
        step: last tokens ``(B'*K, 1)`` -> next-token log-probabilities ``(B'*K, V)`` for the ``B'``
            rows still searching; it advances the model's cache, whose row ``b*K + j`` is row ``b``'s beam ``j``.
        reorder: ``(order (B'*K,), rows (B',) or None)`` -> None; makes cached row ``i`` the old row
            ``order[i]``. ``rows``, given when rows have left, are the old indices of the rows that stay:
            state kept per row rather than per beam (an encoder's memory) keeps only those.
        start: the token each row's beams are fed first ``(B,)``: BOS, or a prompt's last token.
        limits: most generated tokens per row ``(B,)``, EOS included, at least 1.
        beam_size: live hypotheses ``K`` per row.
        nbest: hypotheses returned per row, best first.
        alpha: length-penalty exponent; ``penalty_style`` picks the formula.

    Returns:
        For each row, its ``nbest`` best :class:`Hypothesis` by ``log_prob / length_penalty``.
    """
    if beam_size < 1 or not 1 <= nbest <= beam_size:
        raise ValueError(f"need beam_size >= 1 and 1 <= nbest <= beam_size, got {beam_size} and {nbest}.")
    k, device = beam_size, start.device
    tokens = start.repeat_interleave(k)[:, None]  # (B'*K, 1); column 0 is no part of a hypothesis
    scores = torch.full((start.size(0), k), -math.inf, device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    finished: list[list[Hypothesis]] = [[] for _ in range(start.size(0))]
    searching = torch.arange(start.size(0), device=device)  # each live row's index in the input
    finished_count = torch.zeros(start.size(0), dtype=torch.long, device=device)
    within_beam = torch.arange(2 * k, device=device) < k
    for length in range(1, int(limits.max()) + 1):
        batch = scores.size(0)
        log_probs = step(tokens[:, -1:])
        vocab = log_probs.size(-1)
        log_probs[:, [pad_token_id, bos_token_id]] = -math.inf
        at_limit = (limits <= length).repeat_interleave(k).nonzero().squeeze(1)
        if at_limit.numel():  # only EOS may follow
            eos_log_probs = log_probs[at_limit, eos_token_id]
            log_probs[at_limit] = -math.inf
            log_probs[at_limit, eos_token_id] = eos_log_probs
        # A row's 2K best continuations are among each of its beams' 2K best tokens, so the
        # (B'*K, V) scores are never summed in full.
        width = min(2 * k, vocab)
        beam_log_probs, beam_tokens = log_probs.topk(width, dim=1)  # (B'*K, 2K)
        candidates = (scores.view(-1, 1) + beam_log_probs).view(batch, k * width)
        top_scores, top_index = candidates.topk(min(2 * k, k * width), dim=1)  # (B', 2K), best first
        top_beams, top_tokens = top_index // width, beam_tokens.view(batch, k * width).gather(1, top_index)
        is_eos = top_tokens == eos_token_id
        # An EOS ranked within the top K ends a hypothesis; the K best others continue.
        ends = is_eos & within_beam[: is_eos.size(1)] & top_scores.isfinite()
        penalty = length_penalty(length, alpha, penalty_style)
        for b, rank in ends.nonzero().tolist():
            score, beam = top_scores[b, rank].item(), int(top_beams[b, rank])
            finished[int(searching[b])].append(Hypothesis(tokens[b * k + beam, 1:].tolist(), score / penalty, score))
        next_scores, pick = top_scores.masked_fill(is_eos, -math.inf).topk(k, dim=1)
        finished_count += ends.sum(1)
        stay = ((finished_count < k) & next_scores[:, 0].isfinite()).nonzero().squeeze(1)
        if stay.numel() == 0:
            break
        rows = stay if stay.numel() < batch else None
        if rows is not None:
            per_row = (next_scores, pick, top_beams, top_tokens)
            next_scores, pick, top_beams, top_tokens = (t.index_select(0, rows) for t in per_row)
            searching, limits, finished_count = searching[rows], limits[rows], finished_count[rows]
        next_beams, next_tokens = top_beams.gather(1, pick), top_tokens.gather(1, pick)
        order = (stay[:, None] * k + next_beams).view(-1)
        tokens = torch.cat([tokens.index_select(0, order), next_tokens.view(-1, 1)], dim=1)
        scores = next_scores
        reorder(order, rows)
    return [sorted(hyps, key=lambda h: h.score, reverse=True)[:nbest] for hyps in finished]
