"""``TokenizedDataModule``: what every data module shares, from memory-mapped text to token-budget batches.

A corpus is opened as memory-mapped Arrow text splits; a tokenizer is trained on a bounded sample
of it (or loaded) and travels in checkpoints; every split is tokenised once into an Arrow cache;
loaders pack length-bucketed batches under a padded-token budget, resume mid-epoch and shard
across DDP ranks. A subclass says what its text is and how it becomes ids.
"""

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

from .batch import SplitRows
from .sampler import ResumableDataLoader, TokenBudgetBatchSampler
from .subword_dropout import ResegmentedRows
from .tokenizer import Tokenizer

BATCH_SIZE = 10_000


class TokenizedDataModule(LightningDataModule):
    """Base of the data modules: subclasses implement :meth:`open_text`, :meth:`encode` and :meth:`collate`.

    They also set ``text_columns`` (what the tokenizer trains on), ``id_columns`` (what a batch
    reads besides ``index``) and ``unit`` (what an example is called in messages), and call
    ``save_hyperparameters()``; the hyperparameters ``vocab_size``, ``max_tokens``, ``batch_size``,
    ``max_length``, ``num_workers``, ``seed``, ``tokenizer_path``, ``cache_dir``,
    ``tokenizer_sample_size``, ``normalization`` and ``bpe_dropout`` mean the same in every subclass. Under DDP each
    rank reads its own shard, so the Trainer needs ``use_distributed_sampler=False``.
    """

    text_columns: tuple[str, ...] = ()
    id_columns: tuple[str, ...] = ()
    unit = "examples"

    def __init__(self, max_tokens: int | None, batch_size: int | None, max_length: int,
                 tokenizer_sample_size: int, bpe_dropout: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= bpe_dropout < 1.0:
            raise ValueError(f"bpe_dropout={bpe_dropout} is outside [0, 1). Use 0 to turn it off, or 0.1 as in "
                             "the BPE-dropout paper.")
        if max_tokens is None and batch_size is None:
            raise ValueError("max_tokens and batch_size are both None. Set max_tokens (e.g. 4096) or batch_size.")
        if max_tokens is not None and max_tokens < max_length:
            raise ValueError(f"max_tokens={max_tokens} is below max_length={max_length}, so the longest {self.unit} "
                             "fit in no batch. Raise max_tokens or lower max_length.")
        if tokenizer_sample_size < 1:
            raise ValueError(f"tokenizer_sample_size={tokenizer_sample_size} is not positive. Set it to a number of "
                             f"training {self.unit}, e.g. 1000000.")
        self.bpe_dropout = bpe_dropout
        self.tokenizer: Tokenizer | None = None
        self.splits: dict[str, Dataset] = {}
        self._text: tuple[Path, dict[str, Dataset]] | None = None

    # ----- what a subclass provides -----------------------------------------------------------
    def open_text(self, cache_root: Path) -> tuple[Path, dict[str, Dataset]]:
        """The corpus's cache folder and its memory-mapped raw text splits (``train``, ``validation``[, ``test``])."""
        raise NotImplementedError

    def encode(self, batch: dict[str, list], indices: list[int], tokenizer: Tokenizer, drop: bool) -> dict[str, list]:
        """Raw text rows -> ``id_columns``, ``length`` and ``index``; over-long rows dropped if ``drop``, else cut."""
        raise NotImplementedError

    def collate(self, examples: dict[str, list]) -> dict[str, Any]:
        """``id_columns`` and ``index`` of a batch's rows -> padded tensors (see :mod:`.batch`)."""
        raise NotImplementedError

    # ----- LightningDataModule ----------------------------------------------------------------
    def prepare_data(self) -> None:
        """Convert the corpus to Arrow, train the tokenizer and tokenise every split, unless cached; one process."""
        self._tokenise(self._load_tokenizer())

    def setup(self, stage: str | None = None) -> None:
        """Load the cached tokenizer and tokenised splits; save tokenizer.json next to the logs."""
        trainer = self.trainer
        model_max = getattr(trainer.lightning_module, "hparams", {}).get("max_len") if trainer is not None else None
        if model_max is not None and self.hparams.max_length > model_max:
            raise ValueError(f"data max_length={self.hparams.max_length} exceeds the model's max_len={model_max}, "
                             "so long sequences would overflow its positions; lower data.max_length or raise "
                             "model.max_len.")
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
        """Rows of the test split (the validation split when there is none): sources to translate, lines to continue."""
        # A plain DataLoader: Lightning rebuilds predict loaders to track batch indices, which a
        # subclass with its own signature does not survive.
        split = "test" if "test" in self._split_names() else "validation"
        return self._eval_loader(split, partial(DataLoader, batch_size=None))

    # ----- loaders ----------------------------------------------------------------------------
    def _eval_loader(self, split: str, loader: Callable[..., DataLoader] = ResumableDataLoader) -> DataLoader:
        rank, world_size = self._rank_and_world_size()
        return self._loader(split, self._sampler(split, shuffle=False, rank=rank, world_size=world_size), loader)

    def _sampler(self, split: str, shuffle: bool, rank: int, world_size: int) -> TokenBudgetBatchSampler:
        if split not in self.splits:
            raise RuntimeError(f"The {split} split is not loaded. Call setup() before asking for dataloaders.")
        hp = self.hparams
        return TokenBudgetBatchSampler(
            self.splits[split].with_format("arrow")["length"].to_numpy(), max_tokens=hp.max_tokens,
            batch_size=hp.batch_size, shuffle=shuffle, seed=hp.seed, num_replicas=world_size, rank=rank,
            # Training steps must match across ranks; evaluation must see every example.
            even_batches=shuffle,
        )

    def _loader(self, split: str, sampler: TokenBudgetBatchSampler,
                loader: Callable[..., DataLoader] = ResumableDataLoader) -> DataLoader:
        rows = SplitRows(self.splits[split].select_columns([*self.id_columns, "index"]))
        if split == "train" and self.bpe_dropout:
            encode = partial(self.encode, tokenizer=self.tokenizer.with_dropout(self.bpe_dropout), drop=True)
            rows = ResegmentedRows(rows, self._open()[1]["train"], encode, self.id_columns)
        return loader(
            rows, sampler=sampler, collate_fn=self.collate, num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def _rank_and_world_size(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return 0, 1
        # Lightning would otherwise wrap our sampler in a DistributedSampler, which shards a second
        # time and pads by repeating examples. The Trainer exposes the flag publicly nowhere, and the
        # wrapping happens after this loader is returned, so the connector's copy is the only place
        # to read it; getattr keeps a Lightning that renames it from failing here.
        if getattr(trainer._accelerator_connector, "use_distributed_sampler", False):
            raise ValueError(
                f"{type(self).__name__} shards batches across ranks itself, but the Trainer was created with "
                "use_distributed_sampler=True. Pass Trainer(use_distributed_sampler=False) "
                "(trainer.use_distributed_sampler: false in a config file)."
            )
        return trainer.global_rank, trainer.world_size

    # ----- text, tokenizer, tokenised splits --------------------------------------------------
    def _open(self) -> tuple[Path, dict[str, Dataset]]:
        if self._text is None:
            default_root = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "lightning_transformer"
            root = self.hparams.cache_dir or default_root
            self._text = self.open_text(Path(root).expanduser())
        return self._text

    def _split_names(self) -> list[str]:
        return list(self.splits or self._open()[1])

    def _load_tokenizer(self) -> Tokenizer:
        hp = self.hparams
        if hp.tokenizer_path is not None:
            return self._check_vocab(Tokenizer.load(hp.tokenizer_path), hp.tokenizer_path)
        folder, text = self._open()
        train = text["train"]
        size = min(len(train), hp.tokenizer_sample_size)
        path = folder / f"tokenizer-{hp.vocab_size}-{hp.normalization}-{size}.json"
        if path.is_file():
            return Tokenizer.load(path)
        rank_zero_info(f"Training a {hp.vocab_size}-token BPE tokenizer on {size} of {len(train)} {self.unit}.")
        tokenizer = Tokenizer.train(_sample_texts(train, size, self.text_columns), hp.vocab_size,
                                    length=len(self.text_columns) * size, normalization=hp.normalization)
        # Write then rename, so a concurrent reader never sees half a file.
        partial_path = path.with_suffix(f".{os.getpid()}.tmp")
        tokenizer.save(partial_path)
        partial_path.replace(path)
        return tokenizer

    def _check_vocab(self, tokenizer: Tokenizer, source: str) -> Tokenizer:
        if tokenizer.vocab_size > self.hparams.vocab_size:
            raise ValueError(f"The tokenizer from {source} has {tokenizer.vocab_size} tokens but vocab_size="
                             f"{self.hparams.vocab_size}, so some ids would have no embedding. Set vocab_size to at "
                             f"least {tokenizer.vocab_size}.")
        return tokenizer

    def _tokenise(self, tokenizer: Tokenizer) -> None:
        """Tokenise every split into ``datasets`` cache files keyed by text, tokenizer, max_length and encoding."""
        folder, text = self._open()
        limit = self.hparams.max_length
        fingerprint = f"{tokenizer.to_str()}{limit}{type(self).__qualname__}{self.id_columns}"
        key = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
        for split, raw in text.items():
            encoded = raw.map(
                partial(self.encode, tokenizer=tokenizer, drop=split == "train"),
                batched=True, with_indices=True, batch_size=BATCH_SIZE, remove_columns=raw.column_names,
                # Large record batches: memory-mapping a file maps the pages around each batch's header.
                writer_batch_size=BATCH_SIZE, cache_file_name=str(folder / f"{split}-{key}.arrow"),
                load_from_cache_file=True, new_fingerprint=f"{split}-{key}", desc=f"Tokenising {split}",
            )
            if not len(encoded):
                raise ValueError(f"Every {split} example is longer than max_length={limit} tokens. Raise max_length.")
            if len(encoded) < len(raw):
                rank_zero_info(f"Dropped {len(raw) - len(encoded)} of {len(raw)} training {self.unit} longer than "
                               f"max_length={limit} tokens.")
            self.splits[split] = encoded


def _sample_texts(train: Dataset, size: int, columns: tuple[str, ...]) -> Iterator[str]:
    """The ``columns`` of ``size`` training rows: all of them, or a fixed random sample of a larger split."""
    # A fixed seed, so that a corpus always gives the same tokenizer whatever the training seed.
    rows = np.sort(np.random.default_rng(0).choice(len(train), size, replace=False))
    for batch in train.select(rows).iter(batch_size=BATCH_SIZE):
        for column in columns:
            yield from batch[column]
