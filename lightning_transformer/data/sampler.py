"""Length-bucketed batches under a padded-token budget, shardable and resumable; their loader and contract."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from .batch import Batch


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Yield lists of example indices whose padded size stays within a budget.

    Each epoch, examples are shuffled, then stably sorted by length (so equal
    lengths end up in random order), cut greedily into batches, and the batch
    order is shuffled; this is fairseq's recipe and keeps padding low while
    batch composition still varies between epochs. The order depends only on
    ``seed`` and the epoch set with ``set_epoch``.

    With ``num_replicas > 1`` batch ``i`` goes to rank ``i % num_replicas``, so
    ranks never share an example, and every rank yields the same number of
    batches: ranks enter collectives (DDP, metric syncs, gathers) together. When
    the batch count is not a multiple of ``num_replicas``, training
    (``even_batches``) drops the last few batches of the shuffled order for that
    epoch, and evaluation instead gives each short rank a *filler*: its shortest
    example as a one-sentence batch, yielded as ``[~index]`` (negative), which
    :class:`SplitRows` marks so that it counts nowhere. With one replica every
    example appears exactly once per epoch.

    Args:
        lengths: per-example length in tokens, e.g. ``max(src_len, tgt_len)``.
        max_tokens: token budget per batch, measured as ``len(batch) * longest``
            length in the batch. Takes precedence over ``batch_size``.
        batch_size: sentences per batch, used when ``max_tokens`` is None.
        shuffle: shuffle examples and batches; if False batches come sorted by length.
        seed: base seed; the epoch is added so every epoch has its own order.
        num_replicas: number of data-parallel ranks.
        rank: this process's rank, in ``[0, num_replicas)``.
        even_batches: drop surplus batches (training); if False, pad short
            ranks with filler batches so every example is visited (evaluation).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int | None = None,
        batch_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        even_batches: bool = True,
    ) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1 or len(self.lengths) == 0:
            raise ValueError("lengths must be a non-empty 1-D sequence of example lengths; got no examples.")
        if max_tokens is None and batch_size is None:
            raise ValueError("Both max_tokens and batch_size are None. Set max_tokens (e.g. 4096) or batch_size.")
        if max_tokens is not None and max_tokens <= 0:
            raise ValueError(f"max_tokens={max_tokens} must be a positive number of tokens, e.g. 4096.")
        if max_tokens is None and batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be a positive number of sentences, e.g. 64.")
        if max_tokens is not None and self.lengths.max() > max_tokens:
            longest = int(self.lengths.argmax())
            raise ValueError(
                f"Example {longest} is {self.lengths.max()} tokens long, more than max_tokens={max_tokens}, "
                "so it fits in no batch. Raise max_tokens or drop examples longer than it."
            )
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} is outside [0, num_replicas={num_replicas}). Pass the process's rank.")
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.even_batches = even_batches
        self.epoch = 0
        self._start = 0
        self._yielded = 0
        self._num_batches = len(self._all_batches(np.random.default_rng(0)))
        if even_batches and self._num_batches < num_replicas:
            raise ValueError(
                f"The split packs into {self._num_batches} batch(es), fewer than the {num_replicas} ranks, so some "
                "ranks would train on nothing. Lower max_tokens (or batch_size), add data, or use fewer devices."
            )

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next iteration follows.

        Setting the epoch already set keeps a pending resume from ``load_state_dict``.
        """
        if epoch != self.epoch:
            self.epoch = epoch
            self._start = 0
            self._yielded = 0

    @property
    def start_batch(self) -> int:
        """Index of the first batch the next iteration yields (non-zero after a resume)."""
        return self._start

    def state_dict(self) -> dict[str, int]:
        """Return ``{"epoch", "seed", "batches_yielded"}`` for the current epoch."""
        return {"epoch": self.epoch, "seed": self.seed, "batches_yielded": self._yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next iteration yield the batches of ``state["epoch"]`` not yet yielded."""
        missing = {"epoch", "seed", "batches_yielded"} - state.keys()
        if missing:
            raise ValueError(
                f"The sampler state lacks {sorted(missing)}. "
                "Pass a dict returned by TokenBudgetBatchSampler.state_dict."
            )
        self.epoch = int(state["epoch"])
        self.seed = int(state["seed"])
        self._start = self._yielded = int(state["batches_yielded"])

    def __len__(self) -> int:
        """Batches this rank yields in a full epoch (a resumed epoch yields the remainder)."""
        if self.even_batches:
            return self._num_batches // self.num_replicas
        return -(-self._num_batches // self.num_replicas)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = self._all_batches(rng)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        stop = len(batches) - len(batches) % self.num_replicas if self.even_batches else len(batches)
        mine = batches[self.rank : stop : self.num_replicas]
        mine += [[~int(self.lengths.argmin())]] * (len(self) - len(mine))
        start, self._start = self._start, 0
        self._yielded = start
        for batch in mine[start:]:
            self._yielded += 1
            yield batch

    def _all_batches(self, rng: np.random.Generator) -> list[list[int]]:
        """Cut length-sorted examples into batches for all ranks together."""
        order = rng.permutation(len(self.lengths)) if self.shuffle else np.arange(len(self.lengths))
        order = order[np.argsort(self.lengths[order], kind="stable")]
        if self.max_tokens is None:
            return [order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        return self._pack(order)

    def _pack(self, order: np.ndarray) -> list[list[int]]:
        """Greedily fill batches in ascending length order up to ``max_tokens``.

        Lengths only grow along ``order``, so the newest example is always the
        longest and the padded cost is ``count * its length``.
        """
        batches = []
        begin = 0
        for end, length in enumerate(self.lengths[order].tolist()):
            if (end - begin + 1) * length > self.max_tokens:
                batches.append(order[begin:end].tolist())
                begin = end
        batches.append(order[begin:].tolist())
        return batches


class ResumableDataLoader(DataLoader):
    """DataLoader over a ``TokenBudgetBatchSampler`` whose position survives checkpoints.

    Lightning saves ``state_dict()`` in checkpoints and restores it on resume,
    so an interrupted epoch continues with the batches it had not trained on.
    A batch counts as consumed once this loader has handed it out; Lightning
    does not prefetch from loaders that have a length, so resuming neither
    repeats nor skips a batch.

    Args:
        dataset: rows indexable by a list of indices, e.g. a ``datasets.Dataset``.
        sampler: yields the index list of each batch.
        **kwargs: passed to ``DataLoader`` (``num_workers``, ``collate_fn``, ...).
    """

    def __init__(self, dataset: Any, sampler: TokenBudgetBatchSampler, **kwargs: Any) -> None:
        # batch_size=None hands each index list to the dataset in one call, which
        # datasets answers with one Arrow read instead of one read per sentence.
        # A generator of its own: starting an epoch then draws nothing from the global one that
        # dropout uses, so a resumed run replays the same masks (see ResumeRandomState).
        kwargs.setdefault("generator", torch.Generator().manual_seed(sampler.seed))
        super().__init__(dataset, sampler=sampler, batch_size=None, **kwargs)
        self._consumed = 0
        self._epoch = sampler.epoch

    def __iter__(self) -> Iterator[Batch]:
        self._epoch, self._consumed = self.sampler.epoch, self.sampler.start_batch
        for batch in super().__iter__():
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        if self._epoch != self.sampler.epoch:  # a new epoch was set but not started yet
            return self.sampler.state_dict()
        return {**self.sampler.state_dict(), "batches_yielded": self._consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)
