"""``TranslationDataModule``: parallel text to padded ``src``/``tgt`` id batches, from memory-mapped Arrow caches."""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset

from .base import TokenizedDataModule
from .batch import collate
from .readers import open_corpus
from .tokenizer import PAD_ID, Tokenizer


class TranslationDataModule(TokenizedDataModule):
    """Parallel corpus to padded ``src``/``tgt`` id batches, sized by a padded-token budget.

    Batches hold ``src`` ids ``(B, S)`` ending in ``</s>``, ``tgt`` ids
    ``(B, T)`` wrapped in ``<s> ... </s>``, both padded with id 0, and
    ``index`` ``(B,)``, each pair's position in its split, so that
    ``references(split)[index]`` is its raw target text. Training
    batches are reshuffled every epoch from ``seed``; evaluation batches
    always come in the same order. The tokenizer is saved in checkpoints, so
    a checkpoint alone is enough to translate.

    ``prepare_data`` (one process per node) converts the corpus to Arrow, trains the tokenizer
    and tokenises; ``setup`` then only memory-maps those caches, so memory does not grow with the
    corpus (see :class:`TokenizedDataModule`). Under DDP, each rank reads its own shard: create the
    Trainer with ``use_distributed_sampler=False``.

    Args:
        dataset: "default" for the embedded Tatoeba English-Spanish corpus, a
            local folder, or a Hugging Face hub name.
        format: "auto", "default", "text" ({split}.{lang}[.gz] files), "tsv"
            ({split}.tsv[.gz] with language-code header), "jsonl" ({split}.jsonl
            with a "translation" object), "disk" (save_to_disk folder) or "hub".
        src_lang: source language code.
        tgt_lang: target language code.
        vocab_size: size of the joint BPE vocabulary to train, which the model's
            embeddings use; a given tokenizer must not be larger.
        max_tokens: most padded tokens per batch (sentences x longest sequence).
            Takes precedence over batch_size.
        batch_size: sentences per batch, used only when max_tokens is None.
        max_length: longest sequence in tokens, special tokens included. Longer
            training pairs are dropped; longer evaluation pairs are truncated.
        num_workers: DataLoader worker processes.
        seed: seed of the per-epoch shuffling.
        tokenizer_path: an existing tokenizer.json to use instead of training one.
        cache_dir: folder for the corpus converted to Arrow, the trained tokenizer and tokenised
            splits, in a subfolder named after the corpus files' content
            (default: $XDG_CACHE_HOME/lightning_transformer or ~/.cache/lightning_transformer).
        dataset_config: configuration name of a hub dataset, e.g. "de-en".
        tokenizer_sample_size: most training pairs to train the tokenizer on, which bounds its time and
            memory; a larger corpus is sampled, the same pairs every time (SentencePiece's input_sentence_size).
        normalization: "none" (lossless) or "nfkc", passed to ``Tokenizer.train``; unused with tokenizer_path.
        bpe_dropout: probability of skipping each BPE merge when training pairs are read, so every epoch
            segments them anew (BPE-dropout; 0.1 in its paper); evaluation always uses the plain
            segmentation. 0 reads the cached ids.
    """

    def __init__(
        self,
        dataset: str = "default",
        format: str = "auto",
        src_lang: str = "en",
        tgt_lang: str = "es",
        vocab_size: int = 8000,
        max_tokens: int | None = 4096,
        batch_size: int | None = None,
        max_length: int = 256,
        num_workers: int = 0,
        seed: int = 0,
        tokenizer_path: str | None = None,
        cache_dir: str | None = None,
        dataset_config: str | None = None,
        tokenizer_sample_size: int = 1_000_000,
        normalization: str = "none",
        bpe_dropout: float = 0.0,
    ) -> None:
        if src_lang == tgt_lang:
            raise ValueError(f"src_lang and tgt_lang are both {src_lang!r}. Choose two different languages.")
        super().__init__(max_tokens, batch_size, max_length, tokenizer_sample_size, bpe_dropout)
        self.save_hyperparameters()
        self.vocab_size = vocab_size

    text_columns = ("src", "tgt")
    id_columns = ("src_ids", "tgt_ids")
    unit = "pairs"

    def references(self, split: str) -> list[str]:
        """Raw target sentences of ``split`` ("validation" or "test"), in split order."""
        text = self._open()[1]
        if split not in text:
            raise ValueError(f"There is no {split!r} split; the dataset has {', '.join(text)}.")
        # Read from the memory-mapped split when asked, so only evaluated splits become Python strings.
        return text[split].with_format("arrow")["tgt"].to_pylist()

    def open_text(self, cache_root: Path) -> tuple[Path, dict[str, Dataset]]:
        hp = self.hparams
        return open_corpus(hp.dataset, hp.format, hp.src_lang, hp.tgt_lang, hp.dataset_config, cache_root)

    def encode(self, batch: dict[str, list], indices: list[int], tokenizer: Tokenizer, drop: bool) -> dict[str, list]:
        """``</s>`` after each source, ``<s> ... </s>`` around each target; over-long pairs dropped or cut."""
        max_length = self.hparams.max_length
        out: dict[str, list] = {column: [] for column in (*self.id_columns, "length", "index")}
        eos, bos = tokenizer.eos_id, tokenizer.bos_id
        encoded = zip(indices, tokenizer.encode_batch(batch["src"]), tokenizer.encode_batch(batch["tgt"]))
        for index, src, tgt in encoded:
            src, tgt = src + [eos], [bos] + tgt + [eos]
            if max(len(src), len(tgt)) > max_length:
                if drop:
                    continue
                src, tgt = src[: max_length - 1] + [eos], tgt[: max_length - 1] + [eos]
            out["src_ids"].append(src)
            out["tgt_ids"].append(tgt)
            out["length"].append(max(len(src), len(tgt)))
            out["index"].append(index)
        return out

    def collate(self, examples: dict[str, list]) -> dict:
        return collate(examples, pad_id=PAD_ID)
