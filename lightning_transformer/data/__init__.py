"""Data: corpus readers, the tokenizer, token-budget batching, the batch contract and the data module."""

from .batch import SplitRows, collate, is_filler, unpack_batch
from .readers import open_corpus
from .sampler import ResumableDataLoader, TokenBudgetBatchSampler
from .tokenizer import Tokenizer
from .translation import TranslationDataModule

__all__ = [
    "ResumableDataLoader", "SplitRows", "TokenBudgetBatchSampler", "Tokenizer", "TranslationDataModule",
    "collate", "is_filler", "open_corpus", "unpack_batch",
]
