"""``TranslationDataModule``: parallel text to padded id batches, from memory-mapped Arrow caches."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from .batch import SplitRows, collate
from .readers import open_corpus
from .sampler import ResumableDataLoader, TokenBudgetBatchSampler
from .tokenizer import PAD_ID, Tokenizer

_COLUMNS = ("src_ids", "tgt_ids", "length", "index")


class TranslationDataModule(LightningDataModule):
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
    corpus. Under DDP, each rank reads its own shard: create the Trainer with ``use_distributed_sampler=False``.

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
    ) -> None:
        super().__init__()
        if max_tokens is None and batch_size is None:
            raise ValueError("max_tokens and batch_size are both None. Set max_tokens (e.g. 4096) or batch_size.")
        if max_tokens is not None and max_tokens < max_length:
            raise ValueError(f"max_tokens={max_tokens} is below max_length={max_length}, so the longest pairs fit in "
                             "no batch. Raise max_tokens or lower max_length.")
        if src_lang == tgt_lang:
            raise ValueError(f"src_lang and tgt_lang are both {src_lang!r}. Choose two different languages.")
        if tokenizer_sample_size < 1:
            raise ValueError(f"tokenizer_sample_size={tokenizer_sample_size} is not positive. Set it to a number of "
                             "training pairs, e.g. 1000000.")
        self.save_hyperparameters()
        self.vocab_size = vocab_size
        self.tokenizer: Tokenizer | None = None
        self.splits: dict[str, Dataset] = {}
        self._corpus: tuple[Path, dict[str, Dataset]] | None = None

    def references(self, split: str) -> list[str]:
        """Raw target sentences of ``split`` ("validation" or "test"), in split order."""
        text = self._open()[1]
        if split not in text:
            raise ValueError(f"There is no {split!r} split; the dataset has {', '.join(text)}.")
        # Read from the memory-mapped split when asked, so only evaluated splits become Python strings.
        return text[split].with_format("arrow")["tgt"].to_pylist()

    def prepare_data(self) -> None:
        """Convert the corpus to Arrow, train the tokenizer and tokenise every split, unless cached; one process."""
        self._tokenise(self._load_tokenizer())

    def setup(self, stage: str | None = None) -> None:
        """Load the cached tokenizer and tokenised splits; save tokenizer.json next to the logs."""
        trainer = self.trainer
        model_max = getattr(trainer.lightning_module, "hparams", {}).get("max_len") if trainer is not None else None
        if model_max is not None and self.hparams.max_length > model_max:
            raise ValueError(f"data max_length={self.hparams.max_length} exceeds the model's max_len={model_max}, so "
                             "long sentences would overflow its positions; lower data.max_length or raise model.max_len.")
        if self.tokenizer is None:
            self.tokenizer = self._load_tokenizer()
        self._tokenise(self.tokenizer)
        # Without a logger a run has no folder of its own (log_dir falls back to the working directory).
        if stage == "fit" and trainer is not None and trainer.loggers:
            log_dir = trainer.log_dir  # a collective call under DDP: every rank must make it
            if trainer.is_global_zero and log_dir:
                self.tokenizer.save(Path(log_dir) / "tokenizer.json")

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint the tokenizer as its JSON text."""
        return {"tokenizer": self.tokenizer.to_str()} if self.tokenizer is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the checkpointed tokenizer, re-tokenising if it differs from the current one."""
        if "tokenizer" not in state_dict:
            return
        tokenizer = self._check_vocab(Tokenizer.from_str(state_dict["tokenizer"]), "the checkpoint")
        if tokenizer != self.tokenizer:
            self.tokenizer = tokenizer
            if self.splits:
                self._tokenise(tokenizer)

    def train_dataloader(self) -> ResumableDataLoader:
        rank, world_size = self._rank_and_world_size()
        sampler = self._sampler("train", shuffle=True, rank=rank, world_size=world_size)
        # Lightning calls set_epoch at each epoch start; this covers loaders rebuilt mid-run.
        if self.trainer is not None:
            sampler.set_epoch(self.trainer.current_epoch)
        return self._loader("train", sampler)

    def val_dataloader(self) -> ResumableDataLoader:
        return self._eval_loader("validation")

    def test_dataloader(self) -> ResumableDataLoader:
        if "test" not in self._split_names():
            raise ValueError(
                f"The dataset {self.hparams.dataset!r} has no test split. Add test files or run `validate` instead."
            )
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        """Sources of the test split (the validation split when there is none), for ``predict``."""
        # A plain DataLoader: Lightning rebuilds predict loaders to track batch indices, which a
        # subclass with its own signature does not survive.
        split = "test" if "test" in self._split_names() else "validation"
        return self._eval_loader(split, partial(DataLoader, batch_size=None))

    def _eval_loader(self, split: str, loader: Callable[..., DataLoader] = ResumableDataLoader) -> DataLoader:
        rank, world_size = self._rank_and_world_size()
        return self._loader(split, self._sampler(split, shuffle=False, rank=rank, world_size=world_size), loader)

    def _sampler(self, split: str, shuffle: bool, rank: int, world_size: int) -> TokenBudgetBatchSampler:
        if split not in self.splits:
            raise RuntimeError(f"The {split} split is not loaded. Call setup() before asking for dataloaders.")
        return TokenBudgetBatchSampler(
            self.splits[split].with_format("arrow")["length"].to_numpy(),
            max_tokens=self.hparams.max_tokens,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            seed=self.hparams.seed,
            num_replicas=world_size,
            rank=rank,
            # Training steps must match across ranks; evaluation must see every pair.
            even_batches=shuffle,
        )

    def _loader(self, split: str, sampler: TokenBudgetBatchSampler,
                loader: Callable[..., DataLoader] = ResumableDataLoader) -> DataLoader:
        return loader(
            SplitRows(self.splits[split].select_columns(["src_ids", "tgt_ids", "index"])),
            sampler=sampler,
            collate_fn=partial(collate, pad_id=PAD_ID),
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def _rank_and_world_size(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return 0, 1
        # Lightning would otherwise wrap our sampler in a DistributedSampler, which
        # shards a second time and pads by repeating examples.
        if getattr(trainer._accelerator_connector, "use_distributed_sampler", False):
            raise ValueError(
                "TranslationDataModule shards batches across ranks itself, but the Trainer was created with "
                "use_distributed_sampler=True. Pass Trainer(use_distributed_sampler=False) "
                "(trainer.use_distributed_sampler: false in a config file)."
            )
        return trainer.global_rank, trainer.world_size

    def _open(self) -> tuple[Path, dict[str, Dataset]]:
        """The corpus's cache folder and its memory-mapped ``src``/``tgt`` text splits, converted on first use."""
        if self._corpus is None:
            hp = self.hparams
            root = Path(hp.cache_dir or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "lightning_transformer")
            self._corpus = open_corpus(hp.dataset, hp.format, hp.src_lang, hp.tgt_lang, hp.dataset_config,
                                       root.expanduser())
        return self._corpus

    def _split_names(self) -> list[str]:
        return list(self.splits or self._open()[1])

    def _load_tokenizer(self) -> Tokenizer:
        hp = self.hparams
        if hp.tokenizer_path is not None:
            return self._check_vocab(Tokenizer.load(hp.tokenizer_path), hp.tokenizer_path)
        folder, text = self._open()
        size = min(len(text["train"]), hp.tokenizer_sample_size)
        path = folder / f"tokenizer-{self.vocab_size}-{hp.normalization}-{size}.json"
        if path.is_file():
            return Tokenizer.load(path)
        rank_zero_info(f"Training a {self.vocab_size}-token BPE tokenizer on {size} of {len(text['train'])} pairs.")
        tokenizer = Tokenizer.train(_sample_texts(text["train"], size), self.vocab_size, length=2 * size,
                                    normalization=hp.normalization)
        # Write then rename, so a concurrent reader never sees half a file.
        partial_path = path.with_suffix(f".{os.getpid()}.tmp")
        tokenizer.save(partial_path)
        partial_path.replace(path)
        return tokenizer

    def _check_vocab(self, tokenizer: Tokenizer, source: str) -> Tokenizer:
        if tokenizer.vocab_size > self.vocab_size:
            raise ValueError(f"The tokenizer from {source} has {tokenizer.vocab_size} tokens but vocab_size="
                             f"{self.vocab_size}, so some ids would have no embedding. Set vocab_size to at least "
                             f"{tokenizer.vocab_size}.")
        return tokenizer

    def _tokenise(self, tokenizer: Tokenizer) -> None:
        """Tokenise every split into ``datasets`` cache files keyed by data, tokenizer and max_length."""
        folder, text = self._open()
        # The column list is hashed too, so caches written by older code are never reused.
        fingerprint = f"{tokenizer.to_str()}{self.hparams.max_length}{_COLUMNS}"
        key = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
        for split, raw in text.items():
            encoded = raw.map(
                partial(_encode, tokenizer=tokenizer, max_length=self.hparams.max_length, drop=split == "train"),
                batched=True, with_indices=True, batch_size=10_000, remove_columns=["src", "tgt"],
                # Large record batches: memory-mapping a file maps the pages around each batch's header.
                writer_batch_size=10_000, cache_file_name=str(folder / f"{split}-{key}.arrow"),
                load_from_cache_file=True, new_fingerprint=f"{split}-{key}", desc=f"Tokenising {split}",
            )
            if len(encoded) < len(raw):
                dropped, limit = len(raw) - len(encoded), self.hparams.max_length
                rank_zero_info(f"Dropped {dropped} of {len(raw)} training pairs longer than max_length={limit} tokens.")
            self.splits[split] = encoded


def _sample_texts(train: Dataset, size: int) -> Iterator[str]:
    """Both sides of ``size`` training pairs: all of them, or a fixed random sample of a larger split."""
    # A fixed seed, so that a corpus always gives the same tokenizer whatever the training seed.
    rows = np.sort(np.random.default_rng(0).choice(len(train), size, replace=False))
    for batch in train.select(rows).iter(batch_size=10_000):
        yield from batch["src"]
        yield from batch["tgt"]


def _encode(
    batch: dict[str, list[str]], indices: list[int], tokenizer: Tokenizer, max_length: int, drop: bool
) -> dict[str, list]:
    """Encode a batch of pairs, adding ``</s>`` to sources and ``<s> ... </s>`` to targets.

    Overlong pairs are dropped when ``drop`` is true and truncated otherwise;
    ``index`` keeps each kept pair's position in the split.
    """
    out: dict[str, list] = {column: [] for column in _COLUMNS}
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
