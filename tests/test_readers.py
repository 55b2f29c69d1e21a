import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from tiny_corpus import EN, ES, expected_pairs, write_disk, write_jsonl, write_raw_jsonl, write_text, write_tsv  # noqa: E402

from lightning_transformer.data.readers import open_corpus  # noqa: E402


@pytest.fixture
def read_pairs(tmp_path):
    """The ``(source, target)`` pairs of each split, as ``open_corpus`` gives them."""

    def read(folder, format="auto", src_lang="en", tgt_lang="es"):
        _, splits = open_corpus(str(folder), format, src_lang, tgt_lang, None, tmp_path / "cache")
        return {split: list(zip(dataset["src"], dataset["tgt"])) for split, dataset in splits.items()}

    return read


@pytest.mark.parametrize(
    "writer",
    [
        write_text,
        lambda folder: write_text(folder, compress=True),
        lambda folder: write_text(folder, newline="\r\n"),
        write_tsv,
        write_jsonl,
        write_disk,
        lambda folder: write_disk(folder, nested=False),
    ],
    ids=["text", "text-gz", "text-crlf", "tsv", "jsonl", "disk-translation", "disk-columns"],
)
def test_every_format_loads_the_same_pairs(tmp_path, writer, read_pairs):
    folder = writer(tmp_path / "corpus")
    assert read_pairs(folder) == expected_pairs()


SEPARATORS = {"CR": "\r", "VT": "\x0b", "FF": "\x0c", "LS": "\u2028"}


@pytest.mark.parametrize("separator", SEPARATORS.values(), ids=SEPARATORS.keys())
@pytest.mark.parametrize("writer", [write_text, write_tsv, write_raw_jsonl], ids=["text", "tsv", "jsonl"])
def test_line_separators_inside_a_line_keep_the_pairs_aligned(tmp_path, writer, separator, read_pairs):
    """Lines end at "\\n" only: other separators are text, on both sides (pair 4) or on one side (pair 8)."""
    en, es = list(EN), list(ES)
    en[3], es[3] = en[3].replace(" number", f"{separator}number"), es[3].replace(" número", f"{separator}número")
    en[7] = en[7].replace(" is", f" is{separator}")
    folder = writer(tmp_path / "corpus", en=en, es=es)
    assert read_pairs(folder) == expected_pairs(en, es)


def test_embedded_corpus_has_three_disjoint_splits(read_pairs):
    splits = read_pairs("default")
    assert [len(splits[name]) for name in ("validation", "test")] == [1000, 2000]
    assert len(splits["train"]) > 100_000
    sources = [{src for src, _ in pairs} for pairs in splits.values()]
    assert sum(map(len, sources)) == len(set.union(*sources))


def test_line_count_mismatch_names_both_files(tmp_path, read_pairs):
    folder = write_text(tmp_path / "corpus")
    (folder / "train.es").write_text("".join(line + "\n" for line in ES[:19]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"train\.en has 20 lines but .*train\.es has 19"):
        read_pairs(folder, "text")


def test_empty_file_is_named(tmp_path, read_pairs):
    folder = write_text(tmp_path / "corpus")
    (folder / "val.en").write_bytes(b"")
    with pytest.raises(ValueError, match=r"val\.en is empty"):
        read_pairs(folder)


def test_missing_folder_and_missing_language_files(tmp_path, read_pairs):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_pairs(tmp_path / "nowhere")
    folder = write_text(tmp_path / "corpus")
    with pytest.raises(FileNotFoundError, match=r"train\.fr or train\.fr\.gz is missing"):
        read_pairs(folder, "text", "en", "fr")


def test_missing_validation_split(tmp_path, read_pairs):
    folder = write_tsv(tmp_path / "corpus")
    (folder / "validation.tsv").unlink()
    with pytest.raises(FileNotFoundError, match="has no validation split"):
        read_pairs(folder, "tsv")


def test_undecodable_bytes_name_file_and_encoding(tmp_path, read_pairs):
    folder = write_text(tmp_path / "corpus")
    (folder / "train.es").write_bytes("\n".join(ES[:20]).encode("latin-1"))
    with pytest.raises(ValueError, match=r"train\.es is not valid UTF-8.*Re-encode it as UTF-8"):
        read_pairs(folder, "text")


@pytest.mark.parametrize("writer", [write_tsv, write_jsonl, write_disk], ids=["tsv", "jsonl", "disk"])
def test_missing_language_column(tmp_path, writer, read_pairs):
    folder = writer(tmp_path / "corpus")
    with pytest.raises(ValueError, match="'de'"):
        read_pairs(folder, "auto", "en", "de")


def test_unknown_format_is_rejected(tmp_path, read_pairs):
    with pytest.raises(ValueError, match="format='csv' is not supported"):
        read_pairs(tmp_path, "csv")


def test_empty_lines_are_named_by_position(tmp_path, read_pairs):
    folder = write_text(tmp_path / "corpus")
    lines = (folder / "train.es").read_text(encoding="utf-8").splitlines()
    lines[3] = lines[17] = ""
    (folder / "train.es").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"2 pair\(s\) of the train split .* empty side \(pair number 4, 18.*delete"):
        read_pairs(folder, "text")


def test_a_split_without_examples_is_refused(tmp_path, read_pairs):
    folder = write_tsv(tmp_path / "corpus")
    (folder / "validation.tsv").write_text("id\tes\ten\n", encoding="utf-8")  # a header, no rows
    with pytest.raises(ValueError, match="validation split in .* has no examples"):
        read_pairs(folder, "tsv")
