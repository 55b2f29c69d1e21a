"""A 24-pair English-Spanish corpus written in every format the readers accept."""

import gzip
import json

from datasets import Dataset, DatasetDict

ANIMALS = {"cat": "gato", "dog": "perro", "bird": "pájaro", "horse": "caballo"}
EN = [f"The {en} number {i} is sleeping{' very deeply' * (i % 3)}." for i, en in enumerate(list(ANIMALS) * 6)]
ES = [f"El {es} número {i} duerme{' muy profundamente' * (i % 3)}." for i, es in enumerate(list(ANIMALS.values()) * 6)]
SPLITS = {"train": slice(0, 20), "validation": slice(20, 24)}


def expected_pairs(en=EN, es=ES):
    return {split: list(zip(en[rows], es[rows])) for split, rows in SPLITS.items()}


def write_text(folder, compress=False, en=EN, es=ES, newline="\n"):
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in SPLITS.items():
        name = "val" if split == "validation" else split
        for lang, lines in (("en", en), ("es", es)):
            payload = "".join(line + newline for line in lines[rows]).encode()
            if compress:
                (folder / f"{name}.{lang}.gz").write_bytes(gzip.compress(payload))
            else:
                (folder / f"{name}.{lang}").write_bytes(payload)
    return folder


def write_tsv(folder, en=EN, es=ES):
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in SPLITS.items():
        lines = ["id\tes\ten"] + [f"{i}\t{tgt}\t{src}" for i, (src, tgt) in enumerate(zip(en[rows], es[rows]))]
        (folder / f"{split}.tsv").write_bytes(("\n".join(lines) + "\n").encode())
    return folder


def write_jsonl(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in SPLITS.items():
        records = [{"translation": {"en": en, "es": es}} for en, es in zip(EN[rows], ES[rows])]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return folder


def write_raw_jsonl(folder, en=EN, es=ES):
    """JSON Lines with the text's characters written as they are, control characters included (not escaped)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in SPLITS.items():
        lines = [f'{{"translation": {{"en": "{src}", "es": "{tgt}"}}}}\n' for src, tgt in zip(en[rows], es[rows])]
        (folder / f"{split}.jsonl").write_bytes("".join(lines).encode())
    return folder


def write_disk(folder, nested=True):
    def split_dataset(rows):
        if nested:
            return Dataset.from_dict({"translation": [{"en": en, "es": es} for en, es in zip(EN[rows], ES[rows])]})
        return Dataset.from_dict({"en": EN[rows], "es": ES[rows]})

    DatasetDict({split: split_dataset(rows) for split, rows in SPLITS.items()}).save_to_disk(str(folder))
    return folder

