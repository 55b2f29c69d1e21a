"""Encoder-decoder Transformers for translation, trained the "Attention Is All You Need" way."""

from .allocator import tune_malloc
from .decoding import Hypothesis, beam_search, greedy_decode, length_penalty
from .doctor import TrainingDoctor
from .losses import LabelSmoothingLoss, ProjectedLabelSmoothingLoss, compute_loss
from .masks import create_causal_mask, create_combined_mask, create_padding_mask
from .model import Seq2SeqTransformer
from .schedules import cosine_lambda, cosine_schedule, noam_lambda, noam_schedule
from .transformer import Transformer

__all__ = [
    "Hypothesis",
    "LabelSmoothingLoss",
    "ProjectedLabelSmoothingLoss",
    "Seq2SeqTransformer",
    "TrainingDoctor",
    "Transformer",
    "compute_loss",
    "cosine_lambda",
    "cosine_schedule",
    "create_causal_mask",
    "create_combined_mask",
    "create_padding_mask",
    "beam_search",
    "greedy_decode",
    "length_penalty",
    "noam_lambda",
    "noam_schedule",
    "tune_malloc",
]
