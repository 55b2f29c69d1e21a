"""The LightningModules: steps, masks, loss, logging and optimisation around an ``nn`` network."""

from .base import TokenLevelModule
from .causal_lm import CausalLMTransformer
from .seq2seq import Seq2SeqTransformer

__all__ = ["CausalLMTransformer", "Seq2SeqTransformer", "TokenLevelModule"]
