"""``LanguageModelDataModule``: monolingual text to padded id batches, from memory-mapped Arrow caches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets import Dataset

from .base import TokenizedDataModule
from .batch import collate_lines
from .text_readers import FORMATS, open_text
from .tokenizer import Tokenizer


class LanguageModelDataModule(TokenizedDataModule):
    """Monolingual text to ``tgt`` id batches for a causal language model, sized by a padded-token budget.

    Batches are ``{"tgt": (B, T) ids, "index": (B,)}``: each line as ``<s> ... </s>`` padded with
    id 0, and its position in the split; a filler batch (see :class:`SplitRows`) adds
    ``"filler": True``. The model reads ``tgt[:, :-1]`` and predicts ``tgt[:, 1:]``; ``predict``
    continues each line of the test split (else validation) as a prompt. Caching,
    batching, mid-epoch resume and DDP sharding are :class:`TokenizedDataModule`'s: create the
    Trainer with ``use_distributed_sampler=False``.

    Args:
        dataset: "default" for one language of the embedded corpus, or a local folder.
        format: "auto", "text" (``{split}.txt[.gz]``, one example per line), "jsonl"
            (``{split}.jsonl[.gz]``, lines like ``{"text": ...}``), "tsv" (``{split}.tsv[.gz]`` with
            language-code header, as the embedded corpus) or "disk" (a ``save_to_disk``
            ``DatasetDict`` with a "text" column).
        language: the "tsv" column to read, e.g. "en" or "es" of the embedded corpus.
        vocab_size: size of the BPE vocabulary to train, which the model's embeddings use.
        max_tokens: most padded tokens per batch (lines x longest); takes precedence over batch_size.
        batch_size: lines per batch, used only when max_tokens is None.
        max_length: longest line in tokens, ``<s>``/``</s>`` included. Longer training lines are
            dropped; longer evaluation lines are cut to their first max_length tokens.
        num_workers: DataLoader worker processes.
        seed: seed of the per-epoch shuffling.
        tokenizer_path: an existing tokenizer.json to use instead of training one.
        cache_dir: folder for the Arrow text, tokenizer and tokenised splits, in a subfolder named
            after the input's content (default: $XDG_CACHE_HOME/lightning_transformer).
        tokenizer_sample_size: most training lines to train the tokenizer on (a fixed sample).
        normalization: "none" (lossless) or "nfkc", passed to ``Tokenizer.train``.
        bpe_dropout: probability of skipping each BPE merge when training lines are read (BPE-dropout);
            evaluation always uses the plain segmentation.
    """

    def __init__(
        self, dataset: str = "default", format: str = "auto", language: str = "en", vocab_size: int = 8000,
        max_tokens: int | None = 4096, batch_size: int | None = None, max_length: int = 256, num_workers: int = 0,
        seed: int = 0, tokenizer_path: str | None = None, cache_dir: str | None = None,
        tokenizer_sample_size: int = 1_000_000, normalization: str = "none", bpe_dropout: float = 0.0,
    ) -> None:
        if format not in FORMATS:
            raise ValueError(f"format={format!r} is not supported. Use one of {', '.join(FORMATS)}.")
        super().__init__(max_tokens, batch_size, max_length, tokenizer_sample_size, bpe_dropout)
        self.save_hyperparameters()
        self.vocab_size = vocab_size

    text_columns = ("text",)
    id_columns = ("ids",)
    unit = "lines"

    def open_text(self, cache_root: Path) -> tuple[Path, dict[str, Dataset]]:
        hp = self.hparams
        return open_text(hp.dataset, hp.format, hp.language, cache_root)

    def encode(self, batch: dict[str, list], indices: list[int], tokenizer: Tokenizer, drop: bool) -> dict[str, list]:
        """``<s> ... </s>`` ids per line; over-long lines dropped (``drop``) or cut to their first max_length tokens."""
        max_length = self.hparams.max_length
        out: dict[str, list] = {"ids": [], "length": [], "index": []}
        for index, ids in zip(indices, tokenizer.encode_batch(batch["text"])):
            ids = [tokenizer.bos_id, *ids, tokenizer.eos_id]
            if len(ids) > max_length:
                if drop:
                    continue
                ids = ids[:max_length]
            out["ids"].append(ids)
            out["length"].append(len(ids))
            out["index"].append(index)
        return out

    def collate(self, examples: dict[str, list]) -> dict[str, Any]:
        return collate_lines(examples)
