"""Plot a run's learning curve from its CSVLogger ``metrics.csv`` and tabulate its validations.

    python benchmarks/learning_curve.py runs/multi30k_en_de/lightning_logs/version_0/metrics.csv \
        --output benchmarks/results/multi30k_en_de_curve.png

Needs matplotlib (``pip install matplotlib``); it is not a dependency of the package.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", type=Path)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    rows = read_metrics(args.metrics)
    train = [r for r in rows if "train/loss" in r]
    val = [r for r in rows if "val/loss" in r]
    bleu = [r for r in rows if "val/bleu" in r]

    fig, loss_axis = plt.subplots(figsize=(8, 4.5))
    loss_axis.plot([r["step"] for r in train], [r["train/loss"] for r in train], lw=0.8, alpha=0.6,
                   label="train loss (label-smoothed)")
    loss_axis.plot([r["step"] for r in val], [r["val/loss"] for r in val], "o-", label="val loss (label-smoothed)")
    loss_axis.plot([r["step"] for r in val], [r["val/nll"] for r in val], "s-", label="val NLL")
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("nats per target token")
    loss_axis.set_ylim(bottom=0)
    handles, labels = loss_axis.get_legend_handles_labels()
    if bleu:
        bleu_axis = loss_axis.twinx()
        bleu_axis.plot([r["step"] for r in bleu], [r["val/bleu"] for r in bleu], "D-", color="black",
                       label="val sacreBLEU (beam 4)")
        bleu_axis.set_ylabel("sacreBLEU")
        more_handles, more_labels = bleu_axis.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    loss_axis.legend(handles, labels, loc="upper right")
    loss_axis.set_title(args.title or str(args.metrics))
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=120)

    print("| epoch | step | val loss | val NLL | val ppl | val BLEU | val chrF |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in val:
        extra = next((b for b in bleu if b["step"] == r["step"]), {})
        print(f"| {r['epoch']:.0f} | {r['step']:.0f} | {r['val/loss']:.3f} | {r['val/nll']:.3f} | {r['val/ppl']:.2f} | "
              f"{extra.get('val/bleu', float('nan')):.2f} | {extra.get('val/chrf', float('nan')):.2f} |")


if __name__ == "__main__":
    main()
