"""Autoregressive decoding: greedy and beam search over an encoder-decoder's ``encode``/``decode`` hooks, and
greedy, sampled or beam-searched continuation of prompts for a decoder-only model; both beam searches share
:func:`search_beams`."""

from .decoding import (
    Hypothesis,
    beam_search,
    greedy_decode,
    length_penalty,
    search_beams,
)
from .prompt_search import beam_generate, prompt_beam_search
from .sampling import filter_logits, generate, sample_next, top_k_filter, top_p_filter

__all__ = [
    "Hypothesis", "beam_generate", "beam_search", "filter_logits", "generate", "greedy_decode", "length_penalty",
    "prompt_beam_search", "sample_next", "search_beams", "top_k_filter", "top_p_filter",
]
