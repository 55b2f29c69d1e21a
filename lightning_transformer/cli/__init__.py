"""``lightning-transformer``: LightningCLI (fit, validate, test, predict) and the translate, generate, score,
average and export commands."""

from .main import TransformerCLI, main

__all__ = ["TransformerCLI", "main"]
