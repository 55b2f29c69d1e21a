"""Data: corpus readers, the tokenizer, token-budget batching, the batch contract and the data modules."""

from .base import TokenizedDataModule
from .batch import SplitRows, collate, collate_lines, is_filler, unpack_batch, unpack_lines
from .readers import open_corpus
from .sampler import ResumableDataLoader, TokenBudgetBatchSampler
from .text import LanguageModelDataModule
from .text_readers import open_text
from .tokenizer import Tokenizer
from .translation import TranslationDataModule

__all__ = [
    "LanguageModelDataModule", "ResumableDataLoader", "SplitRows", "TokenBudgetBatchSampler", "TokenizedDataModule",
    "Tokenizer", "TranslationDataModule", "collate", "collate_lines", "is_filler", "open_corpus", "open_text",
    "unpack_batch", "unpack_lines",
]
