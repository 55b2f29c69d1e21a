import gzip
import json
import os
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset, DatasetDict  # noqa: E402

from lightning_transformer import data as data_module  # noqa: E402
from lightning_transformer.readers import load_pairs  # noqa: E402
from lightning_transformer.data import TranslationDataModule  # noqa: E402
from lightning_transformer.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer  # noqa: E402

MULTI30K = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "multi30k"
ANIMALS = {"cat": "gato", "dog": "perro", "bird": "pájaro", "horse": "caballo"}
EN = [f"The {en} number {i} is sleeping{' very deeply' * (i % 3)}." for i, en in enumerate(list(ANIMALS) * 6)]
ES = [f"El {es} número {i} duerme{' muy profundamente' * (i % 3)}." for i, es in enumerate(list(ANIMALS.values()) * 6)]
SPLITS = {"train": slice(0, 20), "validation": slice(20, 24)}


def expected_pairs():
    return {split: list(zip(EN[rows], ES[rows])) for split, rows in SPLITS.items()}


def write_text(folder, compress=False):
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in SPLITS.items():
        name = "val" if split == "validation" else split
        for lang, lines in (("en", EN), ("es", ES)):
            payload = "".join(line + "\n" for line in lines[rows]).encode()
            if compress:
                (folder / f"{name}.{lang}.gz").write_bytes(gzip.compress(payload))
            else:
                (folder / f"{name}.{lang}").write_bytes(payload)
    return folder


def write_tsv(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in SPLITS.items():
        lines = ["id\tes\ten"] + [f"{i}\t{es}\t{en}" for i, (en, es) in enumerate(zip(EN[rows], ES[rows]))]
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def write_jsonl(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in SPLITS.items():
        records = [{"translation": {"en": en, "es": es}} for en, es in zip(EN[rows], ES[rows])]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return folder


def write_disk(folder, nested=True):
    def split_dataset(rows):
        if nested:
            return Dataset.from_dict({"translation": [{"en": en, "es": es} for en, es in zip(EN[rows], ES[rows])]})
        return Dataset.from_dict({"en": EN[rows], "es": ES[rows]})

    DatasetDict({split: split_dataset(rows) for split, rows in SPLITS.items()}).save_to_disk(str(folder))
    return folder


@pytest.mark.parametrize(
    "writer",
    [
        write_text,
        lambda folder: write_text(folder, compress=True),
        write_tsv,
        write_jsonl,
        write_disk,
        lambda folder: write_disk(folder, nested=False),
    ],
    ids=["text", "text-gz", "tsv", "jsonl", "disk-translation", "disk-columns"],
)
def test_every_format_loads_the_same_pairs(tmp_path, writer):
    folder = writer(tmp_path / "corpus")
    assert load_pairs(str(folder), "auto", "en", "es") == expected_pairs()


def test_embedded_corpus_has_three_disjoint_splits():
    splits = load_pairs("default", "auto", "en", "es")
    assert [len(splits[name]) for name in ("validation", "test")] == [1000, 2000]
    assert len(splits["train"]) > 100_000
    sources = [{src for src, _ in pairs} for pairs in splits.values()]
    assert sum(map(len, sources)) == len(set.union(*sources))


def test_line_count_mismatch_names_both_files(tmp_path):
    folder = write_text(tmp_path / "corpus")
    (folder / "train.es").write_text("".join(line + "\n" for line in ES[:19]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"train\.en has 20 lines but .*train\.es has 19"):
        load_pairs(str(folder), "text", "en", "es")


def test_empty_file_is_named(tmp_path):
    folder = write_text(tmp_path / "corpus")
    (folder / "val.en").write_bytes(b"")
    with pytest.raises(ValueError, match=r"val\.en is empty"):
        load_pairs(str(folder), "auto", "en", "es")


def test_missing_folder_and_missing_language_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pairs(str(tmp_path / "nowhere"), "auto", "en", "es")
    folder = write_text(tmp_path / "corpus")
    with pytest.raises(FileNotFoundError, match=r"train\.fr or train\.fr\.gz is missing"):
        load_pairs(str(folder), "text", "en", "fr")


def test_missing_validation_split(tmp_path):
    folder = write_tsv(tmp_path / "corpus")
    (folder / "validation.tsv").unlink()
    with pytest.raises(FileNotFoundError, match="has no validation split"):
        load_pairs(str(folder), "tsv", "en", "es")


def test_undecodable_bytes_name_file_and_encoding(tmp_path):
    folder = write_text(tmp_path / "corpus")
    (folder / "train.es").write_bytes("\n".join(ES[:20]).encode("latin-1"))
    with pytest.raises(ValueError, match=r"train\.es is not valid UTF-8.*Re-encode it as UTF-8"):
        load_pairs(str(folder), "text", "en", "es")


@pytest.mark.parametrize("writer", [write_tsv, write_jsonl, write_disk], ids=["tsv", "jsonl", "disk"])
def test_missing_language_column(tmp_path, writer):
    folder = writer(tmp_path / "corpus")
    with pytest.raises(ValueError, match="'de'"):
        load_pairs(str(folder), "auto", "en", "de")


def test_unknown_format_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="format='csv' is not supported"):
        load_pairs(str(tmp_path), "csv", "en", "es")


def test_empty_lines_are_named_by_position(tmp_path):
    folder = write_text(tmp_path / "corpus")
    lines = (folder / "train.es").read_text(encoding="utf-8").splitlines()
    lines[3] = lines[17] = ""
    (folder / "train.es").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"2 pair\(s\) of the train split .* empty side \(pair number 4, 18.*delete"):
        load_pairs(str(folder), "text", "en", "es")


def test_a_split_without_examples_is_refused(tmp_path):
    folder = write_tsv(tmp_path / "corpus")
    (folder / "validation.tsv").write_text("id\tes\ten\n", encoding="utf-8")  # a header, no rows
    with pytest.raises(ValueError, match="validation split in .* has no examples"):
        load_pairs(str(folder), "tsv", "en", "es")


def test_same_source_and_target_language_is_refused(tmp_path):
    with pytest.raises(ValueError, match="src_lang and tgt_lang are both 'en'"):
        TranslationDataModule(str(tmp_path), src_lang="en", tgt_lang="en")


@pytest.fixture
def folder_module(tmp_path):
    folder = write_tsv(tmp_path / "corpus")
    defaults = {"vocab_size": 200, "max_tokens": 256, "max_length": 32, "cache_dir": str(tmp_path / "cache")}
    return lambda **options: TranslationDataModule(str(folder), **{**defaults, **options})


def test_batches_follow_the_contract(folder_module):
    datamodule = folder_module()
    datamodule.prepare_data()
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert set(batch) == {"src", "tgt", "index"}
    assert batch["src"].dtype == batch["tgt"].dtype == batch["index"].dtype == torch.long
    assert (batch["tgt"][:, 0] == BOS_ID).all()
    for row in [*batch["src"], *batch["tgt"]]:
        ids = row[row != PAD_ID]
        assert ids[-1] == EOS_ID and (row[len(ids) :] == 0).all()
    texts = datamodule.tokenizer.decode_batch(batch["src"])
    assert texts == [EN[i] for i in batch["index"].tolist()]
    assert datamodule.tokenizer.vocab_size <= datamodule.vocab_size == 200


def test_evaluation_indices_point_at_raw_references(folder_module):
    datamodule = folder_module(max_tokens=64)
    datamodule.setup("validate")
    references = datamodule.references("validation")
    assert references == ES[20:24]
    seen = []
    for batch in datamodule.val_dataloader():
        decoded = datamodule.tokenizer.decode_batch(batch["tgt"])
        assert decoded == [references[i] for i in batch["index"].tolist()]
        seen += batch["index"].tolist()
    assert sorted(seen) == [0, 1, 2, 3]


def test_overlong_training_pairs_are_dropped_and_evaluation_pairs_truncated(folder_module):
    full = folder_module()
    full.setup("fit")
    lengths = [*full.splits["train"]["length"], *full.splits["validation"]["length"]]
    limit = sorted(lengths)[len(lengths) // 2]
    datamodule = folder_module(max_length=limit)
    datamodule.setup("fit")
    train, validation = datamodule.splits["train"], datamodule.splits["validation"]
    assert len(train) == sum(length <= limit for length in full.splits["train"]["length"]) < 20
    assert len(validation) == 4
    assert max(*train["length"], *validation["length"]) <= limit
    assert all(ids[-1] == EOS_ID for ids in validation["tgt_ids"])


def test_second_setup_reuses_cached_tokenizer_and_tokens(folder_module, monkeypatch):
    first = folder_module()
    first.setup("fit")

    def forbidden(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(Tokenizer, "train", forbidden)
    monkeypatch.setattr(data_module, "_encode", forbidden)
    second = folder_module()
    second.setup("fit")
    assert second.tokenizer == first.tokenizer
    assert list(second.splits["train"]["src_ids"]) == list(first.splits["train"]["src_ids"])


def test_tokenizer_round_trips_through_state_dict(folder_module):
    trained = folder_module()
    trained.setup("fit")
    state = trained.state_dict()
    assert json.loads(state["tokenizer"])["model"]["type"] == "BPE"
    restored = folder_module()
    restored.load_state_dict(state)
    assert restored.tokenizer == trained.tokenizer


def test_given_tokenizer_larger_than_vocab_size_is_rejected(folder_module, tmp_path):
    path = tmp_path / "big.json"
    tokenizer = Tokenizer.train(EN + ES, vocab_size=150)
    tokenizer.save(path)
    folder_module(tokenizer_path=str(path), vocab_size=150).setup("fit")
    with pytest.raises(ValueError, match=f"has {tokenizer.vocab_size} tokens but vocab_size=100"):
        folder_module(tokenizer_path=str(path), vocab_size=100).setup("fit")


def test_missing_test_split_and_batching_options_are_clear_errors(folder_module):
    datamodule = folder_module()
    datamodule.setup("fit")
    with pytest.raises(ValueError, match="has no test split"):
        datamodule.test_dataloader()
    with pytest.raises(ValueError, match="both None"):
        folder_module(max_tokens=None)
    with pytest.raises(ValueError, match="max_tokens=16 is below max_length=32"):
        folder_module(max_tokens=16)


def test_distributed_sampler_flag_must_be_off_under_ddp(folder_module):
    datamodule = folder_module(max_tokens=64)
    datamodule.setup("fit")

    def attach(rank, flag):
        connector = SimpleNamespace(use_distributed_sampler=flag)
        datamodule.trainer = SimpleNamespace(
            world_size=2, global_rank=rank, current_epoch=1, _accelerator_connector=connector
        )

    attach(0, True)
    with pytest.raises(ValueError, match="use_distributed_sampler=False"):
        datamodule.train_dataloader()
    shards = []
    for rank in (0, 1):
        attach(rank, False)
        shards.append({index for batch in datamodule.train_dataloader().sampler for index in batch})
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    datamodule.trainer = None


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    datamodule = TranslationDataModule(vocab_size=1000, cache_dir=str(tmp_path_factory.mktemp("cache")))
    datamodule.setup("fit")
    return datamodule


def test_embedded_corpus_batches_respect_the_budget_with_little_padding(embedded):
    padding = tokens = 0
    for batch in embedded.train_dataloader():
        src, tgt = batch["src"], batch["tgt"]
        assert src.shape[0] * max(src.shape[1], tgt.shape[1]) <= 4096
        padding += int((src == 0).sum() + (tgt == 0).sum())
        tokens += src.numel() + tgt.numel()
    assert padding / tokens < 0.15


def test_embedded_corpus_epoch_covers_every_training_pair(embedded):
    sampler = embedded.train_dataloader().sampler
    indices = [i for batch in sampler for i in batch]
    assert sorted(indices) == list(range(len(embedded.splits["train"])))


@pytest.mark.skipif(not MULTI30K.is_dir(), reason=f"Multi30k not found at {MULTI30K} (shared data is optional)")
def test_multi30k_folder(tmp_path):
    datamodule = TranslationDataModule(str(MULTI30K), tgt_lang="de", vocab_size=500, cache_dir=str(tmp_path))
    datamodule.setup("fit")
    assert len(datamodule.splits["validation"]) == 1014
    batch = next(iter(datamodule.val_dataloader()))
    assert batch["src"].shape[0] * max(batch["src"].shape[1], batch["tgt"].shape[1]) <= 4096
    assert datamodule.tokenizer.decode(batch["tgt"][0]).strip()


def test_max_length_beyond_the_models_positions_is_refused_before_training(folder_module, tmp_path):
    from lightning.pytorch import Trainer

    from lightning_transformer import Seq2SeqTransformer

    model = Seq2SeqTransformer(src_vocab_size=200, tgt_vocab_size=200, d_model=32, nhead=4, num_encoder_layers=1,
                               num_decoder_layers=1, dim_feedforward=64, max_len=16)
    trainer = Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, max_steps=1)
    with pytest.raises(ValueError, match="max_length=32 exceeds the model's max_len=16.*lower data.max_length"):
        trainer.fit(model, folder_module())
    assert trainer.global_step == 0
