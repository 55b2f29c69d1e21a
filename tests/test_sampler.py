import lightning as L
import numpy as np
import pytest
import torch
from datasets import Dataset

from lightning_transformer.data import ResumableDataLoader, SplitRows, TokenBudgetBatchSampler, collate, is_filler

LENGTHS = np.random.default_rng(0).integers(2, 60, size=3000)


def flatten(batches):
    return [i for batch in batches for i in batch]


@pytest.mark.parametrize("options", [{"max_tokens": 512}, {"batch_size": 32}])
def test_every_example_appears_exactly_once_per_epoch(options):
    sampler = TokenBudgetBatchSampler(LENGTHS, **options)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(flatten(batches)) == list(range(len(LENGTHS)))


def test_padded_cost_never_exceeds_the_budget_and_padding_is_low():
    batches = list(TokenBudgetBatchSampler(LENGTHS, max_tokens=512))
    padded = [len(batch) * LENGTHS[batch].max() for batch in batches]
    assert max(padded) <= 512
    assert 1 - LENGTHS.sum() / sum(padded) < 0.05


def test_batch_size_mode_fixes_the_number_of_sentences():
    sizes = sorted(len(batch) for batch in TokenBudgetBatchSampler(LENGTHS, batch_size=32))
    assert sizes == [len(LENGTHS) % 32] + [32] * (len(LENGTHS) // 32)


def test_order_depends_on_seed_and_epoch_only():
    def order(seed, epoch):
        sampler = TokenBudgetBatchSampler(LENGTHS, max_tokens=512, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(0, 2)
    assert order(0, 1) != order(1, 1)


def test_unshuffled_order_is_sorted_by_length():
    batches = list(TokenBudgetBatchSampler(LENGTHS, max_tokens=512, shuffle=False))
    assert list(LENGTHS[flatten(batches)]) == sorted(LENGTHS)


def test_ranks_get_disjoint_shards_of_equal_size():
    total = len(TokenBudgetBatchSampler(LENGTHS, max_tokens=500))
    assert total % 2 == 1  # so one surplus batch must be dropped
    ranks = [TokenBudgetBatchSampler(LENGTHS, max_tokens=500, num_replicas=2, rank=r) for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(3)
    shards = [list(sampler) for sampler in ranks]
    assert len(shards[0]) == len(shards[1]) == len(ranks[0]) == total // 2
    assert not set(flatten(shards[0])) & set(flatten(shards[1]))


def real(batches):
    return [batch for batch in batches if batch[0] >= 0]


def test_uneven_sharding_keeps_every_example_and_pads_short_ranks_with_a_filler():
    ranks = [
        TokenBudgetBatchSampler(LENGTHS, max_tokens=500, num_replicas=3, rank=r, even_batches=False) for r in range(3)
    ]
    shards = [list(sampler) for sampler in ranks]
    assert [len(shard) for shard in shards] == [len(sampler) for sampler in ranks] == [66, 66, 66]
    assert [len(real(shard)) for shard in shards] == [66, 66, 65]
    assert sorted(i for shard in shards for i in flatten(real(shard))) == list(range(len(LENGTHS)))
    assert shards[2][-1] == [~int(LENGTHS.argmin())]  # one sentence, the shortest


def test_more_ranks_than_evaluation_batches_gives_every_rank_one_batch():
    lengths = [5, 7, 6]  # one batch
    shards = [list(TokenBudgetBatchSampler(lengths, max_tokens=100, shuffle=False, num_replicas=4, rank=r,
                                           even_batches=False)) for r in range(4)]
    assert shards == [[[0, 2, 1]], [[~0]], [[~0]], [[~0]]]


def test_split_rows_flag_filler_batches_and_collate_keeps_the_flag():
    rows = SplitRows(Dataset.from_dict({"src_ids": [[5, 2], [6, 7, 2]], "tgt_ids": [[1, 5, 2], [1, 2]],
                                        "index": [0, 1]}))
    assert not is_filler(collate(rows[[1, 0]], pad_id=0))
    filler = collate(rows[[~1]], pad_id=0)
    assert is_filler(filler) and filler["index"].tolist() == [1] and filler["src"].tolist() == [[6, 7, 2]]


def test_training_shards_with_fewer_batches_than_ranks_are_refused():
    with pytest.raises(ValueError, match="packs into 1 batch.*fewer than the 4 ranks.*Lower max_tokens"):
        TokenBudgetBatchSampler([5, 7, 6], max_tokens=100, num_replicas=4, rank=0)


def test_resuming_mid_epoch_yields_exactly_the_remaining_batches():
    sampler = TokenBudgetBatchSampler(LENGTHS, max_tokens=512, seed=5)
    sampler.set_epoch(2)
    full = list(sampler)
    iterator = iter(sampler)
    consumed = [next(iterator) for _ in range(7)]
    state = sampler.state_dict()
    assert state == {"epoch": 2, "seed": 5, "batches_yielded": 7}

    resumed = TokenBudgetBatchSampler(LENGTHS, max_tokens=512)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # Lightning sets the epoch again after restoring
    assert consumed + list(resumed) == full
    assert list(resumed) == full  # the following iteration is a whole epoch again


def test_loader_checkpoint_counts_batches_handed_out():
    dataset = {
        "src_ids": [[5] * n for n in LENGTHS],
        "tgt_ids": [[6] * (n + 1) for n in LENGTHS],
        "index": list(range(len(LENGTHS))),
    }
    rows = _Rows(dataset)
    sampler = TokenBudgetBatchSampler(LENGTHS, max_tokens=512)
    loader = ResumableDataLoader(rows, sampler, collate_fn=lambda batch: collate(batch, pad_id=0))
    full = [batch["index"].tolist() for batch in loader]
    iterator = iter(loader)
    [next(iterator) for _ in range(4)]
    state = loader.state_dict()
    assert state["batches_yielded"] == 4

    fresh = ResumableDataLoader(rows, TokenBudgetBatchSampler(LENGTHS, max_tokens=512), collate_fn=loader.collate_fn)
    fresh.load_state_dict(state)
    assert [batch["index"].tolist() for batch in fresh] == full[4:]


class _Recorder(L.LightningModule):
    """Records the indices of every training batch it sees."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def train_dataloader(self):
        lengths = LENGTHS[:300]
        rows = _Rows({"src_ids": [[5] * n for n in lengths], "tgt_ids": [[6] * n for n in lengths],
                      "index": range(300)})
        sampler = TokenBudgetBatchSampler(lengths, max_tokens=512)
        return ResumableDataLoader(rows, sampler, collate_fn=lambda batch: collate(batch, pad_id=0))

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["index"].tolist())
        return self.weight.sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_lightning_resumes_mid_epoch_without_repeating_or_skipping(tmp_path):
    def fit(module, ckpt_path=None):
        checkpoints = L.pytorch.callbacks.ModelCheckpoint(tmp_path, every_n_train_steps=5, save_top_k=-1)
        trainer = L.Trainer(
            max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[checkpoints]
        )
        trainer.fit(module, ckpt_path=ckpt_path)

    original = _Recorder()
    fit(original)
    resumed = _Recorder()
    fit(resumed, ckpt_path=tmp_path / "epoch=0-step=5.ckpt")
    assert resumed.seen == original.seen[5:]
    assert original.seen[: len(original.seen) // 2] != original.seen[len(original.seen) // 2 :]


def test_collate_pads_with_the_pad_id():
    batch = collate({"src_ids": [[4, 2], [4, 5, 6, 2]], "tgt_ids": [[1, 7, 2], [1, 2]], "index": [8, 3]}, pad_id=0)
    assert batch["src"].tolist() == [[4, 2, 0, 0], [4, 5, 6, 2]]
    assert batch["tgt"].tolist() == [[1, 7, 2], [1, 2, 0]]
    assert batch["index"].tolist() == [8, 3]


def test_example_longer_than_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="more than max_tokens=10"):
        TokenBudgetBatchSampler([3, 12, 4], max_tokens=10)


@pytest.mark.parametrize(
    "options, message",
    [
        ({}, "Set max_tokens"),
        ({"max_tokens": 0}, "max_tokens=0 must be a positive"),
        ({"batch_size": -1}, "batch_size=-1 must be a positive"),
        ({"max_tokens": 99, "num_replicas": 2, "rank": 2}, "rank=2 is outside"),
    ],
)
def test_bad_arguments_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        TokenBudgetBatchSampler(LENGTHS, **options)


def test_incomplete_state_is_rejected():
    with pytest.raises(ValueError, match="lacks \\['batches_yielded'\\]"):
        TokenBudgetBatchSampler(LENGTHS, max_tokens=512).load_state_dict({"epoch": 0, "seed": 0})


class _Rows:
    """Columns indexable by a list of row numbers, like ``datasets.Dataset``."""

    def __init__(self, columns):
        self.columns = columns

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def __getitem__(self, rows):
        return {name: [values[i] for i in rows] for name, values in self.columns.items()}
