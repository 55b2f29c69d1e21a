"""``lightning-transformer``: LightningCLI (fit, validate, test, predict) and the translate, generate and average commands."""

from .main import TransformerCLI, main

__all__ = ["TransformerCLI", "main"]
