"""Monolingual text in several formats as memory-mapped Arrow splits of one ``text`` column.

``open_text`` converts each split once, in a cache folder named after the input's content, like
:func:`~lightning_transformer.data.readers.open_corpus` for parallel text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from itertools import islice
from pathlib import Path

import pyarrow as pa
from datasets import Dataset, DatasetDict, load_from_disk

from .readers import (
    DEFAULT_CORPUS,
    REQUIRED_SPLITS,
    SPLIT_NAMES,
    arrow_file,
    cache_key,
    content_hash,
    find_split_files,
    read_lines,
)

FORMATS = ("auto", "text", "jsonl", "tsv", "disk")
# Part of every cache key, so that splits converted by an older reader are never reused.
READER_VERSION = "lm-1"
SCHEMA = pa.schema({"text": pa.string()})
BATCH_SIZE = 10_000

Lines = Iterator[str]


def open_text(dataset: str, format: str, language: str, cache_root: Path) -> tuple[Path, dict[str, Dataset]]:
    """Open monolingual text as memory-mapped datasets with one stripped ``text`` column.

    Returns the cache folder (named after the input's content) and its ``train``, ``validation``
    and, when present, ``test`` splits. Bad input raises ``FileNotFoundError``/``ValueError``.
    """
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not supported. Use one of {', '.join(FORMATS)}.")
    folder = DEFAULT_CORPUS if dataset == "default" else Path(dataset).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"Dataset folder {folder} does not exist. Check the path in `dataset`.")
    if format == "auto":
        format = _detect_format(dataset, folder)
    if format == "disk":
        loaded = load_from_disk(str(folder))
        if not isinstance(loaded, DatasetDict):
            raise ValueError(f"{folder} holds a single Dataset. Save a DatasetDict with train and validation splits.")
        readers = {SPLIT_NAMES[name]: partial(_arrow_lines, split, f"{folder} ({name})")
                   for name, split in loaded.items() if name in SPLIT_NAMES}
        files = sorted(path for path in folder.rglob("*") if path.is_file())
    else:
        stem, read = {"tsv": (".tsv", partial(_tsv_lines, language=language)), "text": (".txt", read_lines),
                      "jsonl": (".jsonl", _jsonl_lines)}[format]
        found = find_split_files(folder, stem)
        readers = {split: partial(read, path) for split, path in found.items()}
        files = list(found.values())
    missing = [name for name in REQUIRED_SPLITS if name not in readers]
    if missing:
        raise FileNotFoundError(f"{folder} has no {' or '.join(missing)} split for format {format!r}. Add the files "
                                f"(split names: {', '.join(SPLIT_NAMES)}) or point `dataset` elsewhere.")
    key = [f"{path.relative_to(folder)}:{content_hash(path, cache_root / 'file-hashes')}" for path in files]
    cache = cache_root / cache_key([READER_VERSION, format, language if format == "tsv" else "", *key])
    splits = {}
    for split, read in readers.items():
        path = cache / f"{split}-lm-text.arrow"
        if not path.is_file():
            _write_split(path, read(), f"the {split} split of {folder}")
        splits[split] = Dataset.from_file(str(path))
    return cache, splits


def _detect_format(dataset: str, folder: Path) -> str:
    names = {path.name.removesuffix(".gz") for path in folder.iterdir()}
    for format, found in (("tsv", dataset == "default"), ("disk", "dataset_dict.json" in names),
                          ("jsonl", any(name.endswith(".jsonl") for name in names)),
                          ("tsv", any(name.endswith(".tsv") for name in names)),
                          ("text", any(name.endswith(".txt") for name in names))):
        if found:
            return format
    raise ValueError(f"Cannot tell the format of {folder}. Expected a save_to_disk folder, {{split}}.jsonl, "
                     "{split}.tsv or {split}.txt files; set `format` explicitly if the names differ.")


def _write_split(path: Path, lines: Lines, where: str) -> None:
    """Write ``lines`` to an Arrow file, refusing a split without lines or with an empty one."""
    count = 0
    with arrow_file(path, SCHEMA) as writer:
        while batch := list(islice(lines, BATCH_SIZE)):
            if "" in batch:
                raise ValueError(f"Example {count + batch.index('') + 1} of {where} is empty. Remove empty lines: "
                                 "one example per line.")
            writer.write_batch(pa.record_batch([batch], schema=SCHEMA))
            count += len(batch)
        if not count:
            raise ValueError(f"{where} has no examples. Add some or remove its file.")


def _tsv_lines(path: Path, language: str) -> Lines:
    lines = read_lines(path)
    columns = next(lines).split("\t")
    if language not in columns:
        raise ValueError(f"{path} has no {language!r} column (columns: {', '.join(columns)}). Set `language` to one.")
    column = columns.index(language)
    for row in lines:
        yield row.split("\t")[column].strip()


def _jsonl_lines(path: Path) -> Lines:
    for number, line in enumerate(read_lines(path), start=1):
        try:
            record = json.loads(line, strict=False)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number} is not valid JSON ({error.msg}). Write one object per line.") from None
        if not isinstance(record, dict) or "text" not in record:
            raise ValueError(f'{path}:{number} has no "text" entry. Write lines like {{"text": "..."}}.')
        yield str(record["text"]).strip()


def _arrow_lines(dataset: Dataset, where: str) -> Lines:
    if "text" not in dataset.column_names:
        raise ValueError(f"{where} has no 'text' column (columns: {', '.join(dataset.column_names)}). Rename the "
                         "column holding the text to 'text'.")
    for batch in dataset.select_columns(["text"]).iter(batch_size=BATCH_SIZE):
        yield from ((text or "").strip() for text in batch["text"])
