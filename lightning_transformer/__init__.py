"""Encoder-decoder and decoder-only Transformers, trained the "Attention Is All You Need" way.

The subpackages are the layers of the design: ``nn`` (pure-torch building blocks and networks),
``losses`` and ``schedules``, ``modules`` (the LightningModules), ``data``, ``generation``
(decoding), ``callbacks`` and ``cli``.
"""

try:
    # Before torch: imported after it, CTranslate2's decoding ran 2x slower on the project's machine
    # (7.6 s instead of 3.6 s for Multi30k validation, benchmarks/results/inference.md), its bundled
    # libraries then resolving symbols against those torch loaded first.
    import ctranslate2  # noqa: F401
except ImportError:  # an optional extra (lightning-transformer[ct2])
    pass

from .callbacks import TrainingDoctor, TranslationMetrics
from .cli.allocator import tune_malloc
from .data import LanguageModelDataModule, TranslationDataModule
from .generation import Hypothesis, beam_search, greedy_decode, length_penalty
from .losses import LabelSmoothingLoss, ProjectedLabelSmoothingLoss, compute_loss
from .modules import CausalLMTransformer, Seq2SeqTransformer, TokenLevelModule
from .nn import Transformer, create_causal_mask, create_combined_mask, create_padding_mask
from .precision import BF16MasterWeights
from .schedules import cosine_lambda, cosine_schedule, noam_lambda, noam_schedule

__all__ = [
    "BF16MasterWeights",
    "CausalLMTransformer",
    "Hypothesis",
    "LabelSmoothingLoss",
    "LanguageModelDataModule",
    "ProjectedLabelSmoothingLoss",
    "Seq2SeqTransformer",
    "TokenLevelModule",
    "TrainingDoctor",
    "TranslationDataModule",
    "TranslationMetrics",
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
