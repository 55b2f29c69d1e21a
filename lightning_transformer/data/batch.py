"""The batch contract: padded ``{"src", "tgt", "index"}`` id tensors, filler batches, and ``unpack_batch``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

Batch = dict[str, torch.Tensor]


PAIR_COLUMNS = (("src", "src_ids"), ("tgt", "tgt_ids"))


def collate(examples: dict[str, list], pad_id: int, columns: tuple[tuple[str, str], ...] = PAIR_COLUMNS) -> Batch:
    """Pad a batch of id lists to its longest sequence.

    Args:
        examples: ``{"src_ids": [...], "tgt_ids": [...], "index": [...]}``, one
            id list and one position in the split per sentence.
        pad_id: id used for padding.
        columns: ``(batch key, example column)`` of each padded tensor.

    Returns:
        ``{"src": (B, S), "tgt": (B, T), "index": (B,)}`` int64 tensors, and ``"filler": True`` for a
        filler batch (see :class:`SplitRows`).
    """
    batch = {
        key: pad_sequence([torch.tensor(ids) for ids in examples[column]], batch_first=True, padding_value=pad_id)
        for key, column in columns
    }
    batch["index"] = torch.tensor(examples["index"])
    if examples.get("filler"):
        batch["filler"] = True
    return batch


def collate_lines(examples: dict[str, list], pad_id: int = 0) -> Batch:
    """A language model's batch: ``{"ids": [...], "index": [...]}`` -> ``{"tgt": (B, T), "index": (B,)}``,
    keeping ``filler``."""
    return collate(examples, pad_id, columns=(("tgt", "ids"),))


def is_filler(batch) -> bool:
    """Whether ``batch`` only keeps its rank in step with the others and must count nowhere."""
    return isinstance(batch, Mapping) and bool(batch.get("filler", False))


class SplitRows:
    """A split's rows for a sampler's index list, as ``{column: values}``.

    A filler batch, yielded as negative indices ``~i`` (see :class:`TokenBudgetBatchSampler`), reads
    rows ``i`` and is flagged ``filler``: evaluation runs it, so every rank takes part in each
    collective, but neither losses, BLEU nor predictions count it.

    Args:
        dataset: rows indexable by a list of indices, e.g. a ``datasets.Dataset``.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: list[int]) -> dict[str, Any]:
        if indices and indices[0] < 0:
            return {**self.dataset[[~i for i in indices]], "filler": True}
        return self.dataset[indices]

def unpack_batch(batch, need_target: bool = True) -> tuple[Tensor, Tensor | None]:
    """A batch is ``(src, tgt)`` or a mapping with keys ``src`` and ``tgt``, both ``(B, L)`` ids."""
    if isinstance(batch, Mapping):
        missing = [key for key in ("src", "tgt")[: 1 + need_target] if key not in batch]
        if missing:
            raise KeyError(f"the batch mapping lacks {missing}; it needs 'src' and 'tgt', got {sorted(batch)}.")
        return batch["src"], batch.get("tgt")
    if isinstance(batch, (tuple, list)) and len(batch) in (1 + need_target, 2):
        return batch[0], batch[1] if len(batch) == 2 else None
    raise TypeError(
        f"a batch must be a (src, tgt) pair of token-id tensors or a mapping with 'src' and 'tgt', "
        f"got {type(batch).__name__}."
    )


def unpack_lines(batch) -> Tensor:
    """A language model's batch is ``(B, T)`` ids, a 1-tuple of them, or a mapping with key ``tgt``."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        if "tgt" not in batch:
            raise KeyError(f"the batch mapping lacks 'tgt', the (batch, length) token ids; got {sorted(batch)}.")
        return batch["tgt"]
    if isinstance(batch, (tuple, list)) and len(batch) == 1:
        return batch[0]
    raise TypeError(f"a language model's batch is a (batch, length) id tensor, a 1-tuple of one, or {{'tgt': ids}}; "
                    f"got {type(batch).__name__}.")
