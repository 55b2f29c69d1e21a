"""Autoregressive decoding: greedy and beam search over an encoder-decoder's ``encode``/``decode`` hooks, and
greedy or sampled continuation of prompts for a decoder-only model."""

from .decoding import Hypothesis, beam_search, greedy_decode, length_penalty
from .sampling import filter_logits, generate, sample_next, top_k_filter, top_p_filter

__all__ = [
    "Hypothesis", "beam_search", "filter_logits", "generate", "greedy_decode", "length_penalty", "sample_next",
    "top_k_filter", "top_p_filter",
]
