"""The LightningModules: steps, masks, loss, logging and optimisation around an ``nn`` network."""

from .base import TokenLevelModule
from .seq2seq import Seq2SeqTransformer

__all__ = ["Seq2SeqTransformer", "TokenLevelModule"]
