"""Read parallel corpora in several on-disk formats into ``(source, target)`` pairs.

Every reader returns ``{"train": pairs, "validation": pairs[, "test": pairs]}``
and raises ``FileNotFoundError``/``ValueError`` with the fix in the message
instead of letting a deep traceback out.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from datasets import DatasetDict, load_dataset, load_from_disk

DEFAULT_CORPUS = Path(__file__).parent / "corpus"
FORMATS = ("auto", "default", "text", "tsv", "jsonl", "disk", "hub")
# Common spellings of split names on disk, mapped to the names used everywhere else.
SPLIT_NAMES = {
    "train": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}
REQUIRED_SPLITS = ("train", "validation")

Pairs = list[tuple[str, str]]


def load_pairs(dataset: str, format: str, src_lang: str, tgt_lang: str, config: str | None = None) -> dict[str, Pairs]:
    """Load a parallel corpus as stripped ``(source, target)`` string pairs per split.

    Args:
        dataset: ``"default"`` for the embedded corpus, a local folder, or a hub name.
        format: one of ``FORMATS``; ``"auto"`` picks from the folder's contents.
        src_lang: source language code, e.g. ``"en"``.
        tgt_lang: target language code, e.g. ``"es"``.
        config: hub configuration name (``format="hub"`` only), e.g. ``"de-en"``.

    Returns:
        Pairs for ``train`` and ``validation``, and for ``test`` when present.
    """
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not supported. Use one of {', '.join(FORMATS)}.")
    if format == "auto":
        format = detect_format(dataset)
    if format == "hub":
        splits, where = _read_hub(dataset, config, src_lang, tgt_lang), dataset
    else:
        folder = DEFAULT_CORPUS if format == "default" else Path(dataset).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"Dataset folder {folder} does not exist. Check the path in `dataset`.")
        readers = {"default": _read_tsv, "tsv": _read_tsv, "text": _read_text, "jsonl": _read_jsonl, "disk": _read_disk}
        splits, where = readers[format](folder, src_lang, tgt_lang), str(folder)
        missing = [name for name in REQUIRED_SPLITS if name not in splits]
        if missing:
            raise FileNotFoundError(
                f"{folder} has no {' or '.join(missing)} split for format {format!r}. Add the files "
                f"(split names: {', '.join(SPLIT_NAMES)}) or point `dataset` at another folder."
            )
    for split, pairs in splits.items():
        _check_pairs(split, pairs, where)
    return splits


def _check_pairs(split: str, pairs: Pairs, where: str) -> None:
    if not pairs:
        raise ValueError(f"The {split} split in {where} has no examples. Add some or remove its file.")
    empty = [number for number, (src, tgt) in enumerate(pairs, start=1) if not src or not tgt]
    if empty:
        shown = ", ".join(map(str, empty[:5])) + (", ..." if len(empty) > 5 else "")
        raise ValueError(
            f"{len(empty)} pair(s) of the {split} split in {where} have an empty side (pair number {shown}, counting "
            "from 1 in file order). Every pair needs text in both languages; delete those lines on both sides."
        )


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


def _find(folder: Path, stem: str) -> dict[str, Path]:
    """Map split names to files named ``{split}{stem}`` or ``{split}{stem}.gz``."""
    found = {}
    for disk_name, split in SPLIT_NAMES.items():
        for path in (folder / f"{disk_name}{stem}", folder / f"{disk_name}{stem}.gz"):
            if path.is_file() and split not in found:
                found[split] = path
    return found


def _lines(path: Path) -> list[str]:
    """Return the stripped lines of a UTF-8 text file, gzip-compressed or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8-sig") as handle:
            lines = [line.strip() for line in handle]
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not valid UTF-8 (byte {error.start}: {error.reason}). "
            "Re-encode it as UTF-8, e.g. `iconv -f latin1 -t utf-8`."
        ) from None
    except gzip.BadGzipFile:
        raise ValueError(f"{path} ends in .gz but is not gzip data. Compress it with gzip or drop the suffix.") from None
    if not lines:
        raise ValueError(f"{path} is empty. Put one example per line in it, or remove the file.")
    return lines


def _read_text(folder: Path, src_lang: str, tgt_lang: str) -> dict[str, Pairs]:
    sources, targets = _find(folder, f".{src_lang}"), _find(folder, f".{tgt_lang}")
    splits = {}
    for split in sorted(sources.keys() | targets.keys()):
        if split not in sources or split not in targets:
            present, lang = (sources[split], tgt_lang) if split in sources else (targets[split], src_lang)
            stem = present.name.split(".")[0]
            raise FileNotFoundError(
                f"{present} has no {lang!r} counterpart: {stem}.{lang} or {stem}.{lang}.gz is missing in {folder}. "
                "Add it, or set src_lang/tgt_lang to languages whose files exist."
            )
        src, tgt = _lines(sources[split]), _lines(targets[split])
        if len(src) != len(tgt):
            raise ValueError(
                f"{sources[split]} has {len(src)} lines but {targets[split]} has {len(tgt)}. "
                "Aligned files need one translation per line; fix the alignment."
            )
        splits[split] = list(zip(src, tgt))
    return splits


def _read_tsv(folder: Path, src_lang: str, tgt_lang: str) -> dict[str, Pairs]:
    splits = {}
    for split, path in _find(folder, ".tsv").items():
        header, *rows = _lines(path)
        columns = header.split("\t")
        src_col, tgt_col = (_column(columns, lang, path) for lang in (src_lang, tgt_lang))
        pairs = []
        for number, row in enumerate(rows, start=2):
            fields = row.split("\t")
            if len(fields) != len(columns):
                raise ValueError(
                    f"{path}:{number} has {len(fields)} tab-separated fields but the header has {len(columns)}. "
                    "Fields must not contain tabs; fix or remove the line."
                )
            pairs.append((fields[src_col].strip(), fields[tgt_col].strip()))
        splits[split] = pairs
    return splits


def _column(columns: list[str], lang: str, path: Path) -> int:
    if lang not in columns:
        raise ValueError(
            f"{path} has no {lang!r} column (columns: {', '.join(columns)}). "
            "Name the header columns by language code or set src_lang/tgt_lang to existing columns."
        )
    return columns.index(lang)


def _read_jsonl(folder: Path, src_lang: str, tgt_lang: str) -> dict[str, Pairs]:
    splits = {}
    for split, path in _find(folder, ".jsonl").items():
        pairs = []
        for number, line in enumerate(_lines(path), start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not valid JSON ({error.msg}). Write one object per line.") from None
            # Hugging Face translation sets nest the languages under "translation".
            translation = record.get("translation", record) if isinstance(record, dict) else {}
            for lang in (src_lang, tgt_lang):
                if lang not in translation:
                    raise ValueError(
                        f"{path}:{number} has no {lang!r} entry. Write lines like "
                        f'{{"translation": {{"{src_lang}": ..., "{tgt_lang}": ...}}}} or fix src_lang/tgt_lang.'
                    )
            pairs.append((str(translation[src_lang]).strip(), str(translation[tgt_lang]).strip()))
        splits[split] = pairs
    return splits


def _read_disk(folder: Path, src_lang: str, tgt_lang: str) -> dict[str, Pairs]:
    loaded = load_from_disk(str(folder))
    if not isinstance(loaded, DatasetDict):
        raise ValueError(
            f"{folder} holds a single Dataset. Save a DatasetDict with train and validation splits instead."
        )
    return _from_dataset_dict(loaded, src_lang, tgt_lang, str(folder))


def _read_hub(name: str, config: str | None, src_lang: str, tgt_lang: str) -> dict[str, Pairs]:
    try:
        loaded = load_dataset(name, config)
    except Exception as error:
        raise ValueError(
            f"Could not load {name!r} from the Hugging Face hub ({type(error).__name__}: {error}). "
            "Check the name and your connection (HF_DATASETS_OFFLINE=1 forbids downloads); "
            "for a local folder, pass a path starting with './' or '/'."
        ) from None
    return _from_dataset_dict(loaded, src_lang, tgt_lang, name)


def _from_dataset_dict(loaded, src_lang: str, tgt_lang: str, where: str) -> dict[str, Pairs]:
    splits = {}
    for disk_name, dataset in loaded.items():
        split = SPLIT_NAMES.get(disk_name)
        if split is None:
            continue
        if "translation" in dataset.column_names:
            rows = _translations(dataset["translation"], src_lang, tgt_lang, where)
        else:
            for lang in (src_lang, tgt_lang):
                if lang not in dataset.column_names:
                    raise ValueError(
                        f"Split {disk_name!r} of {where} has neither a 'translation' nor a {lang!r} column "
                        f"(columns: {', '.join(dataset.column_names)}). Fix src_lang/tgt_lang or the columns."
                    )
            rows = zip(dataset[src_lang], dataset[tgt_lang])
        splits[split] = [(src.strip(), tgt.strip()) for src, tgt in rows]
    return splits


def _translations(records: list[dict], src_lang: str, tgt_lang: str, where: str) -> Iterator[tuple[str, str]]:
    for lang in (src_lang, tgt_lang):
        if records and lang not in records[0]:
            raise ValueError(
                f"The 'translation' column of {where} has no {lang!r} entry (languages: {', '.join(records[0])}). "
                "Set src_lang/tgt_lang to languages it contains."
            )
    return ((record[src_lang], record[tgt_lang]) for record in records)
