"""Autoregressive decoding: greedy, sampled and beam-searched translation over an encoder-decoder's
``encode``/``decode`` hooks, forced decoding (scoring) of given translations, and greedy, sampled or beam-searched
continuation of prompts for a decoder-only model; both beam searches share :func:`search_beams`."""

from .decoding import (
    Hypothesis,
    beam_search,
    greedy_decode,
    length_penalty,
    sampler,
    search_beams,
)
from .prompt_search import beam_generate, prompt_beam_search
from .sampling import filter_logits, generate, sample_next, top_k_filter, top_p_filter
from .scoring import score_ids

__all__ = [
    "Hypothesis", "beam_generate", "beam_search", "filter_logits", "generate", "greedy_decode", "length_penalty",
    "prompt_beam_search", "sample_next", "sampler", "score_ids", "search_beams", "top_k_filter", "top_p_filter",
]
