"""How the data pipeline's time and memory grow with the corpus: first setup, cached setup, memory per process.

Corpora of real sentences, the embedded Tatoeba English-Spanish corpus and Multi30k English-German
repeated and shuffled to size, are written as text files (``train.en``/``train.mul``: English to
Spanish or German; the validation split is both corpora's, 2,014 pairs, at every size). Each
measurement runs in a fresh process:

- first setup: ``prepare_data()`` then ``setup("fit")`` on an empty cache, as the one process per
  node that prepares the data does (reading, tokenizer training, tokenising);
- cached setup: ``setup("fit")`` on the warm cache, as every further rank does;
- the peak memory of each: peak RSS (``VmHWM`` from just after the imports; it also counts the
  pages of memory-mapped files the process touched) and peak anonymous RSS (``RssAnon``, the
  process's private memory, sampled every 20 ms).

``--baseline REF`` also measures, at ``--baseline-sizes``, this package with the data module of commit
REF (its ``data.py`` and ``readers.py``), so that only the data pipeline differs.
The corpus files are dated an hour back, as a corpus downloaded earlier is.

    python benchmarks/data_scaling.py [--sizes 0.1 1 4.5] [--quick] [--baseline REF] [--baseline-sizes 0.1 1]
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
EMBEDDED = ROOT / "lightning_transformer" / "data" / "corpus"
MULTI30K = ROOT.parent / "shared" / "data" / "multi30k"


def _kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def child(role: str, corpus: str, cache: str, vocab_size: int) -> dict:
    """Run one setup in this process and report its time and memory."""
    import datasets

    import lightning_transformer
    from lightning_transformer.data import TranslationDataModule

    datasets.disable_progress_bars()
    imported = _kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS restarts from here
    peak_anon, done = [_kib("RssAnon")], threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak_anon[0] = max(peak_anon[0], _kib("RssAnon"))

    threading.Thread(target=sample, daemon=True).start()
    data = TranslationDataModule(corpus, format="text", src_lang="en", tgt_lang="mul", vocab_size=vocab_size,
                                 cache_dir=cache)
    start = time.perf_counter()
    if role == "first":
        data.prepare_data()
    data.setup("fit")
    seconds = time.perf_counter() - start
    done.set()
    return {"seconds": seconds, "peak_rss_mib": _kib("VmHWM") / 1024, "imported_rss_mib": imported / 1024,
            "peak_anon_mib": max(peak_anon[0], _kib("RssAnon")) / 1024, "train_pairs": len(data.splits["train"]),
            "package": str(Path(lightning_transformer.__file__).parent)}


def measure(role: str, corpus: Path, cache: Path, vocab_size: int, package_root: Path | None) -> dict:
    # The package next to this script, or the baseline's, whatever the environment has installed.
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(package_root or ROOT)}
    command = [sys.executable, __file__, "--child", role, str(corpus), str(cache), str(vocab_size)]
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{role} setup failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    expected = package_root / "lightning_transformer" if package_root else ROOT / "lightning_transformer"
    assert Path(result["package"]) == expected, f"measured {result['package']}, not {expected}"
    return result


def read_sentences() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Training and validation pairs of the embedded corpus and of Multi30k, English first."""
    def tsv(name: str) -> list[tuple[str, str]]:
        with gzip.open(EMBEDDED / f"{name}.tsv.gz", "rt", encoding="utf-8") as handle:
            next(handle)  # header: en, es, attribution
            return [tuple(line.rstrip("\n").split("\t")[:2]) for line in handle]

    def multi30k(split: str) -> list[tuple[str, str]]:
        sides = [gzip.open(MULTI30K / f"{split}.{lang}.gz", "rt", encoding="utf-8").read().splitlines()
                 for lang in ("en", "de")]
        return list(zip(*sides))

    return tsv("train") + multi30k("train"), tsv("validation") + multi30k("val")


def write_corpus(folder: Path, train: list[tuple[str, str]], validation: list[tuple[str, str]], size: int) -> None:
    folder.mkdir(parents=True)
    order = np.random.default_rng(0).permutation(np.resize(np.arange(len(train)), size))
    for split, rows in (("train", [train[i] for i in order]), ("val", validation)):
        for side, lang in enumerate(("en", "mul")):
            (folder / f"{split}.{lang}").write_text("".join(pair[side] + "\n" for pair in rows), encoding="utf-8")
    past = time.time() - 3600
    for path in folder.iterdir():
        os.utime(path, (past, past))


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    match = re.search(r"Model name:\s*(.+)", out)
    return f"{match.group(1).strip() if match else 'unknown CPU'}, {os.cpu_count()} cores"


def report(rows: list[dict], args: argparse.Namespace, command: str) -> str:
    new = [row for row in rows if row["code"] == "new"]
    sizes = np.array([row["pairs"] / 1e6 for row in new])
    slope, intercept = np.polyfit(sizes, [row["first"]["seconds"] for row in new], 1) if len(new) > 1 else (0, 0)
    lines = [
        "# Data pipeline cost vs corpus size",
        "",
        f"{datetime.date.today()} · {cpu_name()} (shared with other jobs, load average "
        f"{os.getloadavg()[0]:.1f} at the end) · vocab_size {args.vocab_size} · `{command}`",
        "",
        "First setup = `prepare_data()` + `setup(\"fit\")` on an empty cache (the preparing process); cached setup = "
        "`setup(\"fit\")` on the warm cache (every further rank). Memory: peak RSS after the imports (it includes "
        "touched pages of memory-mapped files, which ranks share) and peak anonymous (private) RSS; "
        f"{new[0]['first']['imported_rss_mib']:.0f} MiB are resident after the imports.",
        "",
        "| code | pairs | first setup (s) | s per M pairs | cached setup (s) | prepare: peak RSS / anon (MiB) "
        "| rank: peak RSS / anon (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        first, rank = row["first"], row["rank"]
        lines.append(
            f"| {row['code']} | {row['pairs']:,} | {first['seconds']:.1f} "
            f"| {first['seconds'] / row['pairs'] * 1e6:.1f} "
            f"| {rank['seconds']:.2f} | {first['peak_rss_mib']:.0f} / {first['peak_anon_mib']:.0f} "
            f"| {rank['peak_rss_mib']:.0f} / {rank['peak_anon_mib']:.0f} |"
        )
    old = {row["pairs"]: row for row in rows if row["code"] == "old"}
    if old:
        lines += ["", "Before / after (old code's value divided by the new one's):", "",
                  "| pairs | first setup | cached setup | prepare: peak anon | rank: peak anon |",
                  "|---:|---:|---:|---:|---:|"]
        for row in new:
            if row["pairs"] in old:
                before = old[row["pairs"]]
                columns = (("first", "seconds"), ("rank", "seconds"), ("first", "peak_anon_mib"),
                           ("rank", "peak_anon_mib"))
                ratio = [before[role][key] / row[role][key] for role, key in columns]
                lines.append(f"| {row['pairs']:,} | " + " | ".join(f"{value:.1f}x" for value in ratio) + " |")
    lines += ["", f"First setup of the new code fits {slope:.1f} s per million pairs {intercept:+.1f} s "
              f"(least squares over {', '.join(f'{size:g}' for size in sizes)} M pairs)."]
    if old:
        lines.append(f"`old` is this package with `data.py` and `readers.py` of commit `{args.baseline}`.")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (times, memory) = plt.subplots(1, 2, figsize=(11, 4))
    for code, style in (("new", "-o"), ("old", "--s")):
        chosen = [row for row in rows if row["code"] == code]
        if not chosen:
            continue
        pairs = [row["pairs"] / 1e6 for row in chosen]
        times.plot(pairs, [row["first"]["seconds"] for row in chosen], style, label=f"{code}: first setup")
        times.plot(pairs, [row["rank"]["seconds"] for row in chosen], style, label=f"{code}: cached setup (rank)")
        memory.plot(pairs, [row["first"]["peak_anon_mib"] for row in chosen], style, label=f"{code}: preparing process")
        memory.plot(pairs, [row["rank"]["peak_anon_mib"] for row in chosen], style, label=f"{code}: further rank")
    times.set(xlabel="training pairs (millions)", ylabel="seconds", title="Setup time")
    memory.set(xlabel="training pairs (millions)", ylabel="MiB", title="Peak anonymous RSS")
    for axes in (times, memory):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.1, 1, 4.5], help="millions of training pairs")
    parser.add_argument("--quick", action="store_true", help="sizes 0.02 and 0.05 only, results not saved")
    parser.add_argument("--baseline", help="also measure the package at this git commit")
    parser.add_argument("--baseline-sizes", type=float, nargs="+", default=[0.1, 1])
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        role, corpus, cache, vocab_size = args.child
        print(json.dumps(child(role, corpus, cache, int(vocab_size))))
        return
    sizes = [0.02, 0.05] if args.quick else args.sizes
    baseline_sizes = sizes if args.quick else args.baseline_sizes
    work = Path(tempfile.mkdtemp(prefix="data_scaling-"))
    try:
        packages = {"new": None}
        if args.baseline:
            packages["old"] = work / "baseline"
            shutil.copytree(ROOT / "lightning_transformer", packages["old"] / "lightning_transformer")
            for name in ("data.py", "readers.py"):
                old = subprocess.run(["git", "-C", str(ROOT), "show", f"{args.baseline}:lightning_transformer/{name}"],
                                     capture_output=True, check=True).stdout
                (packages["old"] / "lightning_transformer" / name).write_bytes(old)
        train, validation = read_sentences()
        rows = []
        for size in sizes:
            pairs = round(size * 1e6)
            corpus = work / f"corpus-{pairs}"
            write_corpus(corpus, train, validation, pairs)
            for code, package_root in packages.items():
                if code == "old" and size not in baseline_sizes:
                    continue
                cache = work / f"cache-{code}-{pairs}"
                first = measure("first", corpus, cache, args.vocab_size, package_root)
                rank = measure("rank", corpus, cache, args.vocab_size, package_root)
                rows.append({"code": code, "pairs": pairs, "first": first, "rank": rank})
                print(f"{code} {pairs:,} pairs: first {first['seconds']:.1f} s, cached {rank['seconds']:.2f} s, "
                      f"anon {first['peak_anon_mib']:.0f} / {rank['peak_anon_mib']:.0f} MiB", flush=True)
                shutil.rmtree(cache)
            shutil.rmtree(corpus)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    command = "python benchmarks/data_scaling.py " + " ".join(sys.argv[1:])
    text = report(rows, args, command.strip())
    print(text)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "data_scaling.md").write_text(text + "\n![setup time and memory](data_scaling.png)\n")
        (RESULTS / "data_scaling.json").write_text(json.dumps(rows, indent=1) + "\n")
        plot(rows, RESULTS / "data_scaling.png")


if __name__ == "__main__":
    main()
