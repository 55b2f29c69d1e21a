"""Generation from a prompt for a decoder-only model: greedy, or sampling with temperature, top-k and top-p.

The model is anything with ``forward(ids, cache=None) -> logits (B, T, V)``, ``init_cache()``,
``pad_token_id`` and ``max_len`` (e.g. :class:`~lightning_transformer.nn.causal.CausalTransformer`).
Prompts may be left- or right-padded: each row is re-packed to start at position 0, so a prompt
gets the same positions, hence the same continuation, whatever its padding and batch.
"""

from __future__ import annotations

import torch
from torch import Tensor


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep each row's ``k`` largest logits and set the rest to ``-inf``.

    Args:
        logits: ``(..., V)``.
        k: tokens to keep, at least 1; ``k >= V`` keeps all. Logits tied with the ``k``-th
            largest are kept too, so that the result does not depend on the order of ties.

    Returns:
        A new tensor shaped like ``logits``.
    """
    if k < 1:
        raise ValueError(f"top_k={k} keeps no token; use top_k >= 1, or None to disable it.")
    if k >= logits.size(-1):
        return logits.clone()
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -torch.inf)


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep each row's smallest set of most likely tokens whose probability is ``>= p``.

    Tokens are taken by decreasing probability until their total reaches ``p``; the most likely
    token is always kept, so at least one survives. The rest are set to ``-inf``.

    Args:
        logits: ``(..., V)``.
        p: probability mass to keep, in ``(0, 1]``; 1 keeps every token.

    Returns:
        A new tensor shaped like ``logits``.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p={p} is outside (0, 1]; use e.g. 0.9, or None to disable it.")
    if p == 1.0:
        return logits.clone()
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.float().softmax(dim=-1)
    # A token is needed iff the more likely ones before it have not yet reached p.
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p
    return logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), -torch.inf)


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> Tensor:
    """``logits / temperature`` then :func:`top_k_filter` and :func:`top_p_filter`: the sampling
    distribution's logits."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive to sample; use temperature=0 in "
                         "sample_next/generate for greedy decoding.")
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return logits


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """Next tokens ``(B,)`` from last-position logits ``(B, V)``: argmax when ``temperature == 0``, else a sample.

    The sample is drawn from ``softmax(filter_logits(logits, temperature, top_k, top_p))`` with
    ``generator`` (which must live on ``logits``' device), so a seeded generator reproduces it.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def pack_prompts(prompts: Tensor, pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Move every row's padding to its end, keeping token order:
    ``(B, P)`` -> (right-padded ``(B, P)``, lengths ``(B,)``)."""
    padding = prompts == pad_token_id
    order = padding.long().argsort(dim=1, stable=True)
    lengths = (~padding).sum(dim=1)
    if (lengths == 0).any():
        row = int((lengths == 0).nonzero()[0])
        raise ValueError(f"prompt row {row} is all padding; start every prompt with at least one token, e.g. <s>.")
    return prompts.gather(1, order), lengths


def prepare_prompts(model, prompts: Tensor, max_new_tokens: int) -> tuple[Tensor, Tensor]:
    """Check the request and :func:`pack_prompts`: ``(B, P)`` -> (right-padded ``(B, P)``, lengths ``(B,)``)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} is negative; ask for 0 or more tokens.")
    if prompts.dim() != 2:
        raise ValueError(f"prompts must be (batch, length) token ids, got shape {tuple(prompts.shape)}; "
                         "add a batch dimension with prompts[None].")
    tokens, lengths = pack_prompts(prompts, model.pad_token_id)
    if int(lengths.max()) > model.max_len:
        raise ValueError(f"a prompt of {int(lengths.max())} tokens exceeds the model's max_len={model.max_len}; "
                         "shorten the prompt or use a model with more positions.")
    return tokens, lengths


@torch.no_grad()
def generate(
    model,
    prompts: Tensor,
    max_new_tokens: int,
    eos_token_id: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Continue each prompt until it emits ``eos_token_id`` or gains ``max_new_tokens`` tokens.

    All rows advance one position per step. A row whose prompt is longer than the shortest one is
    fed its own prompt token while the others already generate, so its continuation starts
    right after its prompt, exactly as if it were alone in the batch.

    Args:
        model: see the module docstring; put it in ``eval()`` mode first for deterministic output.
        prompts: ``(B, P)`` token ids, left- or right-padded with ``model.pad_token_id``.
        max_new_tokens: most generated tokens per row, EOS included; clamped so that prompt and
            continuation fit ``model.max_len`` positions.
        eos_token_id: id that ends a row (kept in the output).
        temperature: 0 for greedy decoding, else the softmax temperature of sampling.
        top_k: sample among the ``k`` most likely tokens only (None: all).
        top_p: sample within the nucleus of probability ``p`` only (None: all).
        generator: random numbers of the sampling, for reproducible output.
        use_cache: feed one new position a step through the key/value cache; ``False`` recomputes
            the whole prefix every step (slow; the reference the cache must match).

    Returns:
        ``(B, L)`` ids: each row's prompt, then its continuation, then ``pad_token_id``.
    """
    pad = model.pad_token_id
    tokens, lengths = prepare_prompts(model, prompts, max_new_tokens)
    ends = (lengths + max_new_tokens).clamp(max=model.max_len)  # each row's final length, at most
    total = int(ends.max())
    tokens = torch.cat([tokens, tokens.new_full((tokens.size(0), total - tokens.size(1)), pad)], dim=1)[:, :total]
    done = ends <= lengths
    cache = model.init_cache() if use_cache else None
    position = int(lengths.min())
    fed = 0
    while position < total and not bool(done.all()):
        # With a cache only the positions not fed yet go in; without, the whole prefix.
        logits = model(tokens[:, fed:position] if use_cache else tokens[:, :position], cache=cache)[:, -1]
        fed = position
        chosen = sample_next(logits, temperature, top_k, top_p, generator).masked_fill(done, pad)
        in_prompt = position < lengths
        tokens[:, position] = chosen = torch.where(in_prompt, tokens[:, position], chosen)
        done |= ~in_prompt & (chosen == eos_token_id)
        position += 1
        done |= position >= ends
    # Rows asked for no new token may keep prompt positions the loop never reached.
    return tokens[:, : max(position, int(lengths.max()))]
