import json
import os
import pickle
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_corpus import EN, ES, write_tsv  # noqa: E402

from lightning_transformer.data import TranslationDataModule  # noqa: E402
from lightning_transformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer  # noqa: E402

MULTI30K = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "multi30k"
OPENED: list[list[str]] = []  # lists that record the paths of opened files, innermost last


def _record_open(event, args):
    if event == "open" and OPENED and isinstance(args[0], (str, os.PathLike)):
        OPENED[-1].append(os.fspath(args[0]))


sys.addaudithook(_record_open)


def age(folder, seconds=3600):
    """Date every file of ``folder`` back, as a corpus downloaded earlier would be."""
    past = time.time() - seconds
    for path in folder.iterdir():
        os.utime(path, (past, past))


def test_same_source_and_target_language_is_refused(tmp_path):
    with pytest.raises(ValueError, match="src_lang and tgt_lang are both 'en'"):
        TranslationDataModule(str(tmp_path), src_lang="en", tgt_lang="en")


@pytest.fixture
def folder_module(tmp_path):
    folder = write_tsv(tmp_path / "corpus")
    defaults = {"dataset": str(folder), "vocab_size": 400, "max_tokens": 256, "max_length": 32,
                "cache_dir": str(tmp_path / "cache")}
    return lambda **options: TranslationDataModule(**{**defaults, **options})


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
    assert datamodule.tokenizer.vocab_size <= datamodule.vocab_size == 400


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


def forbidden(*args, **kwargs):
    raise AssertionError("the cache should have been used")


def test_second_setup_reuses_cached_tokenizer_and_tokens(folder_module, monkeypatch):
    first = folder_module()
    first.setup("fit")
    monkeypatch.setattr(Tokenizer, "train", forbidden)
    monkeypatch.setattr(TranslationDataModule, "encode", forbidden)
    second = folder_module()
    second.setup("fit")
    assert second.tokenizer == first.tokenizer
    assert list(second.splits["train"]["src_ids"]) == list(first.splits["train"]["src_ids"])


def test_setup_on_a_warm_cache_opens_no_corpus_file(folder_module, tmp_path, monkeypatch):
    """Ranks other than the preparing one only open caches: the corpus is neither parsed nor hashed again."""
    age(tmp_path / "corpus")
    folder_module().prepare_data()
    monkeypatch.setattr(Tokenizer, "train", forbidden)
    monkeypatch.setattr(TranslationDataModule, "encode", forbidden)
    OPENED.append([])
    try:
        rank = folder_module()
        rank.setup("fit")
        assert rank.references("validation") == ES[20:24]
    finally:
        opened = OPENED.pop()
    assert not [path for path in opened if Path(path).parent == tmp_path / "corpus"]


def test_an_edited_corpus_never_reuses_a_stale_cache(folder_module, tmp_path):
    """An edit that keeps the size and the modification time still changes the cache key."""
    age(tmp_path / "corpus")
    before = folder_module()
    before.setup("validate")
    path = tmp_path / "corpus" / "validation.tsv"
    stat = path.stat()
    path.write_bytes(path.read_bytes().replace(b"El ", b"Le "))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = folder_module()
    after.setup("validate")
    assert after.references("validation") == [text.replace("El ", "Le ") for text in ES[20:24]]
    assert list(after.splits["validation"]["tgt_ids"]) != list(before.splits["validation"]["tgt_ids"])


def test_a_touched_or_copied_corpus_reuses_the_cache(folder_module, tmp_path, monkeypatch):
    first = folder_module()
    first.setup("fit")
    monkeypatch.setattr(Tokenizer, "train", forbidden)
    monkeypatch.setattr(TranslationDataModule, "encode", forbidden)
    os.utime(tmp_path / "corpus" / "train.tsv")
    copy = shutil.copytree(tmp_path / "corpus", tmp_path / "copy")
    for dataset in (tmp_path / "corpus", copy):
        again = folder_module(dataset=str(dataset))
        again.setup("fit")
        assert again.tokenizer == first.tokenizer


def test_memory_kept_after_setup_does_not_grow_with_the_corpus(tmp_path):
    """Splits stay memory-mapped Arrow files, which pickle as their paths, never as their rows."""
    tokenizer = tmp_path / "tokenizer.json"
    Tokenizer.train(EN + ES, vocab_size=400).save(tokenizer)
    sizes = []
    for repeat in (1, 50):
        folder = write_tsv(tmp_path / f"corpus{repeat:02}")
        header, *rows = (folder / "train.tsv").read_text(encoding="utf-8").splitlines()
        (folder / "train.tsv").write_text("\n".join([header] + rows * repeat) + "\n", encoding="utf-8")
        datamodule = TranslationDataModule(str(folder), vocab_size=400, max_tokens=256, max_length=32,
                                           tokenizer_path=str(tokenizer), cache_dir=str(tmp_path / "cache"))
        datamodule.setup("fit")
        assert len(datamodule.splits["train"]) == 20 * repeat
        assert datamodule.references("validation") == ES[20:24]
        sizes.append(len(pickle.dumps(datamodule)))
    assert sizes[1] - sizes[0] < 100  # the 980 extra pairs hold about 60 kB of text


def test_tokenizer_trains_on_a_bounded_repeatable_sample(folder_module, tmp_path, monkeypatch):
    seen, train = [], Tokenizer.train

    def recording(texts, vocab_size, normalization, **kwargs):
        texts = list(texts)
        seen.append((texts, normalization))
        return train(texts, vocab_size, normalization=normalization, **kwargs)

    monkeypatch.setattr(Tokenizer, "train", recording)
    for cache in ("one", "two"):
        folder_module(tokenizer_sample_size=5, normalization="nfkc", cache_dir=str(tmp_path / cache)).setup("fit")
    folder_module().setup("fit")
    (first, normalization), (second, _), (everything, _) = seen
    assert first == second and len(first) == 10 and normalization == "nfkc"
    english = {EN.index(text) for text in first if text in EN}
    spanish = {ES.index(text) for text in first if text in ES}
    assert english == spanish and max(english) < 20  # five whole training pairs
    assert sorted(everything) == sorted(EN[:20] + ES[:20])


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
    tokenizer = Tokenizer.train(EN + ES, vocab_size=400)
    tokenizer.save(path)
    folder_module(tokenizer_path=str(path), vocab_size=tokenizer.vocab_size).setup("fit")
    smaller = tokenizer.vocab_size - 1
    with pytest.raises(ValueError, match=f"has {tokenizer.vocab_size} tokens but vocab_size={smaller}"):
        folder_module(tokenizer_path=str(path), vocab_size=smaller).setup("fit")


def test_missing_test_split_and_batching_options_are_clear_errors(folder_module):
    datamodule = folder_module()
    datamodule.setup("fit")
    with pytest.raises(ValueError, match="has no test split"):
        datamodule.test_dataloader()
    with pytest.raises(ValueError, match="both None"):
        folder_module(max_tokens=None)
    with pytest.raises(ValueError, match="max_tokens=16 is below max_length=32"):
        folder_module(max_tokens=16)
    with pytest.raises(ValueError, match="tokenizer_sample_size=0 .* positive"):
        folder_module(tokenizer_sample_size=0)


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

    model = Seq2SeqTransformer(src_vocab_size=400, tgt_vocab_size=400, d_model=32, nhead=4, num_encoder_layers=1,
                               num_decoder_layers=1, dim_feedforward=64, max_len=16)
    trainer = Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, max_steps=1)
    with pytest.raises(ValueError, match="max_length=32 exceeds the model's max_len=16.*lower data.max_length"):
        trainer.fit(model, folder_module())
    assert trainer.global_step == 0


def test_bpe_dropout_resegments_training_pairs_at_every_read_and_leaves_evaluation_alone(folder_module):
    plain, dropped = folder_module(), folder_module(bpe_dropout=0.5)
    for datamodule in (plain, dropped):
        datamodule.prepare_data()
        datamodule.setup("fit")
    rows = list(range(len(plain.splits["train"])))
    plain_rows = plain.train_dataloader().dataset[rows]
    reads = [dropped.train_dataloader().dataset[rows] for _ in range(2)]
    assert reads[0]["src_ids"] != reads[1]["src_ids"] != plain_rows["src_ids"]
    for read in reads:
        assert read["index"] == plain_rows["index"]
        for column, language in (("src_ids", EN), ("tgt_ids", ES)):
            texts = dropped.tokenizer.decode_batch(read[column])
            assert texts == [language[i] for i in read["index"]]
            assert all(len(ids) <= 32 for ids in read[column])
    assert sum(map(len, reads[0]["tgt_ids"])) > sum(map(len, plain_rows["tgt_ids"]))
    validation = [[batch["src"].tolist() for batch in module.val_dataloader()] for module in (plain, dropped)]
    assert validation[0] == validation[1]
    with pytest.raises(ValueError, match=r"bpe_dropout=1.0 is outside \[0, 1\)"):
        folder_module(bpe_dropout=1.0)
