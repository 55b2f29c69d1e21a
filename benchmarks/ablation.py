"""What each speed change buys: the project's bf16 training step with one change undone at a time.

Every variant runs in its own process (the allocator setting is process-wide), interleaved over
``--repeats`` rounds, on the synthetic Multi30k-shaped batches of ``profile_step.py``; it reports
the median step time and its ratio to the project as shipped.

    python benchmarks/ablation.py [--preset small] [--steps 20] [--repeats 2] [--dropout 0.3 0.1 0.1]
        [--output-dir benchmarks/results/amd_epyc]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))
from profile_step import PRESETS, synthetic_batch, train_step  # noqa: E402
from throughput_report import device_name  # noqa: E402

from lightning_transformer import LabelSmoothingLoss, Seq2SeqTransformer, tune_malloc  # noqa: E402
from lightning_transformer.nn import layers  # noqa: E402

RESULTS = Path(__file__).parent / "results"
VARIANTS = {
    "as shipped": "",
    "glibc malloc defaults (no `tune_malloc`)": "malloc",
    "`F.dropout` instead of 16-bit-mask `Dropout`": "dropout",
    "16-bit masks applied with `torch.where` (the earlier kernel)": "where",
    "SDPA's math kernel (the earlier choice) instead of `matmul_attention`": "attention",
    "logits + `LabelSmoothingLoss` instead of the fused projection loss": "loss",
    "for-loop Adam instead of fused Adam": "adam",
    "all five undone": "malloc,dropout,attention,loss,adam",
}


def sdpa_math(q, k, v, mask, dropout_p=0.0):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class UnfusedLoss(Seq2SeqTransformer):
    def compute_loss(self, states, tgt_output):
        return LabelSmoothingLoss(self.tgt_vocab_size, self.hparams.label_smoothing)(self.project(states), tgt_output)


def where_dropout(x, p):
    dropped = round(p * 65536)
    words = torch.randint(-(2**63), 2**63 - 1, ((x.numel() + 3) // 4,), dtype=torch.int64)
    keep = words.view(torch.int16)[: x.numel()].view(x.shape) >= dropped - 32768
    return torch.where(keep, x * (65536 / (65536 - dropped)), 0.0)


def child(undo: set[str], preset: str, steps: int, precision: str, dropout: list[float]) -> dict:
    if "malloc" not in undo:
        tune_malloc()
    if "dropout" in undo:
        layers.dropout = lambda x, p, training=True: F.dropout(x, p, training)
    if "where" in undo:
        layers.sixteen_bit_dropout = where_dropout
    if "attention" in undo:
        layers.matmul_attention = sdpa_math
    torch.manual_seed(0)
    model = (UnfusedLoss if "loss" in undo else Seq2SeqTransformer)(
        src_vocab_size=8000, tgt_vocab_size=8000, share_embeddings=True, **PRESETS[preset], dropout=dropout[0],
        attention_dropout=dropout[1], activation_dropout=dropout[2]).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9, fused="adam" not in undo)
    generator = torch.Generator().manual_seed(0)
    batches = [synthetic_batch(64, 8000, generator) for _ in range(steps + 3)]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    seconds = []
    for batch in batches:
        start = time.perf_counter()
        train_step(model, optimizer, batch, autocast)
        seconds.append(time.perf_counter() - start)
    tokens = sum(int((tgt[:, 1:] != 0).sum()) for _, tgt in batches[3:])
    return {"step_ms": statistics.median(seconds[3:]) * 1e3, "tok_s": tokens / sum(seconds[3:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="small")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dropout", type=float, nargs=3, default=[0.1, 0.0, 0.0],
                        metavar=("RESIDUAL", "ATTENTION", "ACTIVATION"), help="the model's three dropout rates")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    parser.add_argument("--child")
    args = parser.parse_args()
    flags = ["--preset", args.preset, "--precision", args.precision, "--steps", str(args.steps),
             "--dropout", *map(str, args.dropout)]
    if args.child is not None:
        undo = set(filter(None, args.child.split(",")))
        print(json.dumps(child(undo, args.preset, args.steps, args.precision, args.dropout)))
        return
    runs = {name: [] for name in VARIANTS}
    for round_ in range(args.repeats):
        order = list(VARIANTS.items())
        for name, undo in order[::-1] if round_ % 2 else order:  # alternate the order: drift hits all alike
            out = subprocess.run([sys.executable, __file__, f"--child={undo}", *flags],
                                 capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {name: {k: statistics.median(r[k] for r in rs) for k in ("step_ms", "tok_s")} for name, rs in runs.items()}
    shipped = med["as shipped"]
    lines = [
        f"# Ablation: {args.preset} preset, {args.precision}, one change undone at a time",
        "",
        f"{datetime.date.today()} · {device_name('cpu')} · torch {torch.__version__} · "
        f"{torch.get_num_threads()} threads · dropout {args.dropout[0]} / attention {args.dropout[1]} / activation "
        f"{args.dropout[2]} · synthetic batches of 64 pairs (10-30 subwords) · median of "
        f"{args.steps} steps, median of {args.repeats} interleaved processes (the order reversed every other round) · "
        f"`python benchmarks/ablation.py {' '.join(flags)} --repeats {args.repeats}`",
        "",
        "| variant | step (ms) | tokens/s | slowdown vs shipped |",
        "|---|---:|---:|---:|",
    ]
    for name, row in med.items():
        slowdown = row["step_ms"] / shipped["step_ms"]
        lines.append(f"| {name} | {row['step_ms']:.0f} | {row['tok_s']:,.0f} | {slowdown:.2f}x |")
    report = "\n".join(lines) + "\n"
    print(report)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.dropout == [0.1, 0.0, 0.0] else "_dropout_" + "_".join(f"{p:g}" for p in args.dropout)
    (args.output_dir / f"ablation_{args.preset}_{args.precision}{suffix}.md").write_text(report)


if __name__ == "__main__":
    main()
