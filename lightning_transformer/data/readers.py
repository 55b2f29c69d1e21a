"""Read parallel corpora in several formats into memory-mapped Arrow splits of ``src``/``tgt`` text.

``open_corpus`` converts each split once into an Arrow file, in a cache folder named after the
content of the input, and afterwards only memory-maps it: no process holds the corpus as Python
strings. Bad input raises ``FileNotFoundError``/``ValueError`` with the fix in the message.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterator
from functools import partial
from itertools import islice, zip_longest
from pathlib import Path

import pyarrow as pa
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from .cache import arrow_file, cache_key, content_hash

DEFAULT_CORPUS = Path(__file__).parent / "corpus"
FORMATS = ("auto", "default", "text", "tsv", "jsonl", "disk", "hub")
# Common spellings of split names on disk, mapped to the names used everywhere else.
SPLIT_NAMES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
               "dev": "validation", "test": "test"}
REQUIRED_SPLITS = ("train", "validation")
# Part of every cache key, so that splits converted by an older reader are never reused.
READER_VERSION = "2"
SCHEMA = pa.schema({"src": pa.string(), "tgt": pa.string()})
BATCH_SIZE = 10_000

Pairs = Iterator[tuple[str, str]]


def open_corpus(
    dataset: str, format: str, src_lang: str, tgt_lang: str, config: str | None, cache_root: Path
) -> tuple[Path, dict[str, Dataset]]:
    """Open a parallel corpus as memory-mapped datasets with stripped ``src`` and ``tgt`` text columns.

    Args:
        dataset: ``"default"`` for the embedded corpus, a local folder, or a hub name.
        format: one of ``FORMATS``; ``"auto"`` picks from the folder's contents.
        src_lang: source language code, e.g. ``"en"``.
        tgt_lang: target language code, e.g. ``"es"``.
        config: hub configuration name (``format="hub"`` only), e.g. ``"de-en"``.
        cache_root: where converted splits go, in a folder per corpus content, and the files' hashes.

    Returns:
        The corpus's cache folder, and its ``train``, ``validation`` and, when present, ``test`` splits.
    """
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not supported. Use one of {', '.join(FORMATS)}.")
    if format == "auto":
        format = detect_format(dataset)
    hashes = cache_root / "file-hashes"
    if format == "hub":
        loaded, where = _load_hub(dataset, config), dataset
        # Hub splits are Arrow caches that `datasets` names by fingerprint, which changes with their data.
        key = [f"{name}:{split._fingerprint}" for name, split in loaded.items()]
        readers = _arrow_readers(loaded, src_lang, tgt_lang, where)
    else:
        folder = DEFAULT_CORPUS if format == "default" else Path(dataset).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"Dataset folder {folder} does not exist. Check the path in `dataset`.")
        where = str(folder)
        if format == "disk":
            loaded = load_from_disk(str(folder))
            if not isinstance(loaded, DatasetDict):
                raise ValueError(f"{folder} holds a single Dataset. Save a DatasetDict with train and validation "
                                 "splits instead.")
            readers = _arrow_readers(loaded, src_lang, tgt_lang, where)
            files = sorted(path for path in folder.rglob("*") if path.is_file())
        else:
            sources = _file_sources(folder, format, src_lang, tgt_lang)
            readers = {split: read for split, (_, read) in sources.items()}
            files = [path for paths, _ in sources.values() for path in paths]
        missing = [name for name in REQUIRED_SPLITS if name not in readers]
        if missing:
            raise FileNotFoundError(f"{folder} has no {' or '.join(missing)} split for format {format!r}. Add the "
                                    f"files (split names: {', '.join(SPLIT_NAMES)}) or point `dataset` elsewhere.")
        key = [f"{path.relative_to(folder)}:{content_hash(path, hashes)}" for path in files]
    cache = cache_root / cache_key([READER_VERSION, format, src_lang, tgt_lang, *key])
    splits = {}
    for split, read in readers.items():
        path = cache / f"{split}-text.arrow"
        if not path.is_file():
            _write_split(path, read(), split, where)
        splits[split] = Dataset.from_file(str(path))
    return cache, splits


def detect_format(dataset: str) -> str:
    """Guess the format of ``dataset`` from the files it contains."""
    if dataset == "default":
        return "default"
    folder = Path(dataset).expanduser()
    if not folder.exists():
        if dataset.startswith((".", "/", "~")) or folder.suffix:
            raise FileNotFoundError(f"Dataset folder {folder} does not exist. Check the path in `dataset`.")
        return "hub"
    names = {path.name for path in folder.iterdir()} if folder.is_dir() else set()
    if "dataset_dict.json" in names:
        return "disk"
    for format, suffix in (("jsonl", ".jsonl"), ("tsv", ".tsv")):
        if any(name.removesuffix(".gz").endswith(suffix) for name in names):
            return format
    if any(name.split(".")[0] in SPLIT_NAMES for name in names):
        return "text"
    raise ValueError(
        f"Cannot tell the format of {folder}. Expected a save_to_disk folder, {{split}}.jsonl, {{split}}.tsv or "
        "{split}.{lang} text files; set `format` explicitly if the names differ."
    )


def _write_split(path: Path, pairs: Pairs, split: str, where: str) -> None:
    """Write ``pairs`` to an Arrow file, refusing a split without pairs or with an empty side."""
    count, empty = 0, []
    with arrow_file(path, SCHEMA) as writer:
        while batch := list(islice(pairs, BATCH_SIZE)):
            empty += [count + number for number, (src, tgt) in enumerate(batch, start=1) if not src or not tgt]
            writer.write_batch(pa.record_batch(list(map(list, zip(*batch))), schema=SCHEMA))
            count += len(batch)
        if not count:
            raise ValueError(f"The {split} split in {where} has no examples. Add some or remove its file.")
        if empty:
            shown = ", ".join(map(str, empty[:5])) + (", ..." if len(empty) > 5 else "")
            raise ValueError(f"{len(empty)} pair(s) of the {split} split in {where} have an empty side (pair number "
                             f"{shown}, counting from 1 in file order). Every pair needs text in both languages; "
                             "delete those lines on both sides.")


def find_split_files(folder: Path, stem: str) -> dict[str, Path]:
    """Map split names to files named ``{split}{stem}`` or ``{split}{stem}.gz``."""
    found = {}
    for disk_name, split in SPLIT_NAMES.items():
        for path in (folder / f"{disk_name}{stem}", folder / f"{disk_name}{stem}.gz"):
            if path.is_file() and split not in found:
                found[split] = path
    return found


def _file_sources(
    folder: Path, format: str, src_lang: str, tgt_lang: str
) -> dict[str, tuple[list[Path], Callable[[], Pairs]]]:
    """Map split names to their input files and a reader of their pairs."""
    if format != "text":
        stem, read = (".jsonl", _jsonl_pairs) if format == "jsonl" else (".tsv", _tsv_pairs)
        files = find_split_files(folder, stem)
        return {split: ([path], partial(read, path, src_lang, tgt_lang)) for split, path in files.items()}
    sources, targets = find_split_files(folder, f".{src_lang}"), find_split_files(folder, f".{tgt_lang}")
    for split in sorted(sources.keys() ^ targets.keys()):
        present, lang = (sources[split], tgt_lang) if split in sources else (targets[split], src_lang)
        stem = present.name.split(".")[0]
        raise FileNotFoundError(f"{present} has no {lang!r} counterpart: {stem}.{lang} or {stem}.{lang}.gz is missing "
                                f"in {folder}. Add it, or set src_lang/tgt_lang to languages whose files exist.")
    return {split: ([src, targets[split]], partial(_text_pairs, src, targets[split])) for split, src in sources.items()}


def read_lines(path: Path) -> Iterator[str]:
    """Yield the stripped lines of a UTF-8 text file, gzip-compressed or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    number = 0
    try:
        # Binary lines end at b"\n" only: "\r", "\x0b", "\x0c" or U+2028 inside a line are text, and
        # splitting there (as text mode and str.splitlines do) would shift every later pair.
        with opener(path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                yield line.decode("utf-8-sig" if number == 1 else "utf-8").strip()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not valid UTF-8 (line {number}, byte {error.start}: {error.reason}). "
                         "Re-encode it as UTF-8, e.g. `iconv -f latin1 -t utf-8`.") from None
    except gzip.BadGzipFile:
        raise ValueError(
            f"{path} ends in .gz but is not gzip data. Compress it with gzip or drop the suffix.") from None
    if not number:
        raise ValueError(f"{path} is empty. Put one example per line in it, or remove the file.")


def _text_pairs(src_path: Path, tgt_path: Path) -> Pairs:
    src_count = tgt_count = 0
    for src, tgt in zip_longest(read_lines(src_path), read_lines(tgt_path)):
        src_count += src is not None
        tgt_count += tgt is not None
        if src_count == tgt_count:
            yield src, tgt
    if src_count != tgt_count:
        raise ValueError(f"{src_path} has {src_count} lines but {tgt_path} has {tgt_count}. "
                         "Aligned files need one translation per line; fix the alignment.")


def _tsv_pairs(path: Path, src_lang: str, tgt_lang: str) -> Pairs:
    lines = read_lines(path)
    columns = next(lines).split("\t")
    for lang in (src_lang, tgt_lang):
        if lang not in columns:
            raise ValueError(f"{path} has no {lang!r} column (columns: {', '.join(columns)}). Name the header "
                             "columns by language code or set src_lang/tgt_lang to existing columns.")
    src_col, tgt_col = columns.index(src_lang), columns.index(tgt_lang)
    for number, row in enumerate(lines, start=2):
        fields = row.split("\t")
        if len(fields) != len(columns):
            raise ValueError(f"{path}:{number} has {len(fields)} tab-separated fields but the header has "
                             f"{len(columns)}. Fields must not contain tabs; fix or remove the line.")
        yield fields[src_col].strip(), fields[tgt_col].strip()


def _jsonl_pairs(path: Path, src_lang: str, tgt_lang: str) -> Pairs:
    for number, line in enumerate(read_lines(path), start=1):
        try:
            # Control characters inside strings are taken as text, as the other formats do.
            record = json.loads(line, strict=False)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number} is not valid JSON ({error.msg}). Write one object per line.") from None
        # Hugging Face translation sets nest the languages under "translation".
        translation = record.get("translation", record) if isinstance(record, dict) else {}
        for lang in (src_lang, tgt_lang):
            if lang not in translation:
                example = f'{{"translation": {{"{src_lang}": ..., "{tgt_lang}": ...}}}}'
                raise ValueError(f"{path}:{number} has no {lang!r} entry. Write lines like {example} or fix "
                                 "src_lang/tgt_lang.")
        yield str(translation[src_lang]).strip(), str(translation[tgt_lang]).strip()


def _load_hub(name: str, config: str | None) -> DatasetDict:
    try:
        return load_dataset(name, config)
    except Exception as error:
        raise ValueError(
            f"Could not load {name!r} from the Hugging Face hub ({type(error).__name__}: {error}). "
            "Check the name and your connection (HF_DATASETS_OFFLINE=1 forbids downloads); "
            "for a local folder, pass a path starting with './' or '/'."
        ) from None


def _arrow_readers(loaded: DatasetDict, src_lang: str, tgt_lang: str, where: str) -> dict[str, Callable[[], Pairs]]:
    return {SPLIT_NAMES[name]: partial(_arrow_pairs, dataset, src_lang, tgt_lang, name, where)
            for name, dataset in loaded.items() if name in SPLIT_NAMES}


def _arrow_pairs(dataset: Dataset, src_lang: str, tgt_lang: str, name: str, where: str) -> Pairs:
    """Pairs of a split with a ``translation`` struct column or one column per language, a batch at a time."""
    nested = "translation" in dataset.column_names
    # Flattening is an Arrow view with "translation.en", "translation.es", ... columns: nothing is copied.
    table, prefix = (dataset.flatten(), "translation.") if nested else (dataset, "")
    for lang in (src_lang, tgt_lang):
        if prefix + lang in table.column_names:
            continue
        if nested:
            languages = ", ".join(column.removeprefix(prefix) for column in table.column_names if prefix in column)
            raise ValueError(
                f"The 'translation' column of {where} has no {lang!r} entry (languages: {languages}). "
                "Set src_lang/tgt_lang to languages it contains."
            )
        raise ValueError(
            f"Split {name!r} of {where} has neither a 'translation' nor a {lang!r} column "
            f"(columns: {', '.join(table.column_names)}). Fix src_lang/tgt_lang or the columns."
        )
    columns = [prefix + src_lang, prefix + tgt_lang]
    for batch in table.select_columns(columns).iter(batch_size=BATCH_SIZE):
        for src, tgt in zip(*(batch[column] for column in columns)):
            yield (src or "").strip(), (tgt or "").strip()
