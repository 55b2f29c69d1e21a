import gzip
import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict

from lightning_transformer.data.text import LanguageModelDataModule
from lightning_transformer.data.text_readers import open_text

TRAIN = [f"the cat number {i} sat on the mat {i % 7}" for i in range(60)] + ["a much longer line " * 20]
VALIDATION = ["the dog sat", "a cat", "on the mat number three"]


def write_text(folder: Path, gz: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, lines in (("train", TRAIN), ("valid", VALIDATION)):
        data = "".join(f"{line}\n" for line in lines).encode()
        if gz:
            (folder / f"{split}.txt.gz").write_bytes(gzip.compress(data))
        else:
            (folder / f"{split}.txt").write_bytes(data)
    return folder


def module(dataset, tmp_path, **kwargs) -> LanguageModelDataModule:
    args = {"vocab_size": 300, "max_tokens": 200, "max_length": 32, "cache_dir": str(tmp_path / "cache")}
    dm = LanguageModelDataModule(str(dataset), **{**args, **kwargs})
    dm.prepare_data()
    dm.setup("fit")
    return dm


def decoded(dm, split="validation"):
    return [dm.tokenizer.decode(row) for batch in dm._eval_loader(split) for row in batch["tgt"]]


def write_jsonl(folder: Path) -> Path:
    folder.mkdir()
    for split, lines in (("train", TRAIN), ("validation", VALIDATION)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    return folder


def write_tsv(folder: Path) -> Path:
    folder.mkdir()
    for split, lines in (("train", TRAIN), ("dev", VALIDATION)):
        (folder / f"{split}.tsv").write_text("fr\ten\n" + "".join(f"x\t{line}\n" for line in lines))
    return folder


def write_disk(folder: Path) -> Path:
    DatasetDict({"train": Dataset.from_dict({"text": TRAIN}),
                 "validation": Dataset.from_dict({"text": VALIDATION})}).save_to_disk(str(folder))
    return folder


def write_text_gz(folder):
    return write_text(folder, gz=True)


@pytest.mark.parametrize("write", [write_text, write_text_gz, write_jsonl, write_tsv, write_disk])
def test_each_format_gives_bos_eos_batches(tmp_path, write):
    dm = module(write(tmp_path / "data"), tmp_path)
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"tgt", "index"} and batch["tgt"].dtype == torch.long
    rows = batch["tgt"]
    assert torch.all(rows[:, 0] == dm.tokenizer.bos_id)
    assert sorted(decoded(dm)) == sorted(VALIDATION)
    for row, index in zip(rows, batch["index"]):
        ids = row[row != 0].tolist()
        assert ids == [dm.tokenizer.bos_id, *dm.tokenizer.encode(VALIDATION[index]), dm.tokenizer.eos_id]
    # The one overlong training line is dropped; an evaluation line would be cut instead.
    assert len(dm.splits["train"]) == len(TRAIN) - 1


def test_default_corpus_works_offline_for_either_language(tmp_path):
    english = module("default", tmp_path, vocab_size=500, max_tokens=2048, max_length=64, tokenizer_sample_size=2000)
    spanish = module("default", tmp_path, language="es", vocab_size=500, max_tokens=2048, max_length=64,
                     tokenizer_sample_size=2000)
    assert len(english.splits["validation"]) == len(spanish.splits["validation"]) == 1000
    assert english.tokenizer.decode(english.splits["validation"][0]["ids"]) == "I did it."
    assert spanish.tokenizer.decode(spanish.splits["validation"][0]["ids"]) == "Lo hice."


def test_token_budget_respected_and_epoch_covers_every_line(tmp_path):
    dm = module(write_text(tmp_path / "data"), tmp_path, max_tokens=64)
    seen = []
    for batch in dm.train_dataloader():
        assert batch["tgt"].numel() <= 64
        seen += batch["index"].tolist()
    assert sorted(seen) == sorted(dm.splits["train"]["index"])


def test_ddp_shards_are_disjoint_and_evaluation_sees_every_line(tmp_path):
    dm = module(write_text(tmp_path / "data"), tmp_path, max_tokens=64)
    shards = {}
    for rank in (0, 1):
        dm._rank_and_world_size = lambda rank=rank: (rank, 2)
        train = [i for batch in dm.train_dataloader() for i in batch["index"].tolist()]
        evaluation = [i for batch in dm.val_dataloader() if not batch.get("filler") for i in batch["index"].tolist()]
        shards[rank] = (set(train), evaluation, len(dm.train_dataloader()))
    assert not shards[0][0] & shards[1][0]
    assert shards[0][2] == shards[1][2]
    assert sorted(shards[0][1] + shards[1][1]) == list(range(len(VALIDATION)))


def test_resume_mid_epoch_continues_with_the_remaining_batches(tmp_path):
    dm = module(write_text(tmp_path / "data"), tmp_path, max_tokens=64)
    loader = dm.train_dataloader()
    batches = iter(loader)
    for _ in range(3):
        next(batches)
    state = loader.state_dict()
    rest = [batch["index"].tolist() for batch in batches]
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    assert [batch["index"].tolist() for batch in resumed] == rest


def test_changed_file_content_is_reread_and_checkpoint_restores_tokenizer(tmp_path):
    folder = write_text(tmp_path / "data")
    first = module(folder, tmp_path)
    (folder / "valid.txt").write_text("a brand new line\n")
    second = module(folder, tmp_path)
    assert decoded(second) == ["a brand new line"]
    restored = LanguageModelDataModule(str(folder), vocab_size=300, max_tokens=200, max_length=32)
    restored.load_state_dict(first.state_dict())
    assert restored.tokenizer == first.tokenizer


def test_bad_input_errors(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_text(str(tmp_path / "nowhere"), "auto", "en", cache)
    with pytest.raises(ValueError, match="format='csv' is not supported"):
        LanguageModelDataModule(str(tmp_path), format="csv")
    only_train = tmp_path / "only_train"
    only_train.mkdir()
    (only_train / "train.txt").write_text("hello\n")
    with pytest.raises(FileNotFoundError, match="no validation split"):
        open_text(str(only_train), "auto", "en", cache)
    empty_line = write_text(tmp_path / "empty_line")
    (empty_line / "train.txt").write_text("one\n\nthree\n")
    with pytest.raises(ValueError, match="Example 2 of the train split .* is empty"):
        open_text(str(empty_line), "auto", "en", cache)
    empty_file = write_text(tmp_path / "empty_file")
    (empty_file / "valid.txt").write_text("")
    with pytest.raises(ValueError, match="valid.txt is empty"):
        open_text(str(empty_file), "text", "en", cache)
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "notes.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="Cannot tell the format"):
        open_text(str(unknown), "auto", "en", cache)
    no_text = tmp_path / "no_text"
    no_text.mkdir()
    for split in ("train", "validation"):
        (no_text / f"{split}.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match='has no "text" entry'):
        open_text(str(no_text), "auto", "en", cache)
    with pytest.raises(ValueError, match="no 'fr' column"):
        open_text("default", "auto", "fr", cache)
    with pytest.raises(ValueError, match="has no test split. Add test files or run `validate` instead"):
        module(write_text(tmp_path / "no_test"), tmp_path).test_dataloader()
