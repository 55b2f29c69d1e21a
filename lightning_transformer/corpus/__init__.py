"""Parallel corpora: the embedded Tatoeba English-Spanish pairs and readers for other formats."""

from .readers import DEFAULT_CORPUS, FORMATS, load_pairs

__all__ = ["DEFAULT_CORPUS", "FORMATS", "load_pairs"]
