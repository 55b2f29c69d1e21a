"""Autoregressive decoding over a model's ``encode``/``decode`` hooks: greedy and beam search."""

from .decoding import Hypothesis, beam_search, greedy_decode, length_penalty

__all__ = ["Hypothesis", "beam_search", "greedy_decode", "length_penalty"]
