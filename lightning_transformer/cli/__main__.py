"""``python -m lightning_transformer.cli``: the same as the ``lightning-transformer`` command."""

from .main import main

main()
