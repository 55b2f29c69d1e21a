"""Peak memory and time of the label-smoothing loss, forward + backward: closed form vs. materialised.

The baseline is written the way the guide writes it: a full ``(tokens x vocab)`` smoothed target
distribution multiplied with ``log_softmax``. Each variant runs in its own process; peak memory is
the rise of the process's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``) above the
resident size once the logits exist, so the logits themselves are not counted but every temporary
and the gradient are.

    python benchmarks/loss_memory.py [--tokens 4096] [--vocab 32000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def guide_label_smoothing(logits, targets, smoothing, pad=0):
    log_probs = logits.log_softmax(dim=-1)
    true_dist = torch.full_like(log_probs, smoothing / (logits.size(-1) - 2))
    true_dist.scatter_(1, targets[:, None], 1.0 - smoothing)
    true_dist[:, pad] = 0
    true_dist[targets == pad] = 0
    return -(true_dist * log_probs).sum() / (targets != pad).sum()


def _kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def child(variant: str, tokens: int, vocab: int) -> dict:
    from lightning_transformer import LabelSmoothingLoss

    torch.manual_seed(0)
    logits = torch.randn(tokens, vocab, requires_grad=True)
    targets = torch.randint(1, vocab, (tokens,))
    targets[: tokens // 10] = 0
    loss_fn = LabelSmoothingLoss(vocab, 0.1) if variant == "closed_form" else (
        lambda z, t: guide_label_smoothing(z, t, 0.1))
    loss_fn(logits[:8], targets[:8]).backward()  # warm up kernels and the allocator
    logits.grad = None
    baseline = _kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    loss = loss_fn(logits, targets)
    loss.backward()
    seconds = time.perf_counter() - start
    return {"peak_mib": (_kib("VmHWM") - baseline) / 1024, "seconds": seconds, "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=["closed_form", "materialised"])
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tokens, args.vocab)))
        return
    runs = {"closed_form": [], "materialised": []}
    for _ in range(args.repeats):  # interleaved A B A B
        for variant in runs:
            out = subprocess.run([sys.executable, __file__, "--child", variant, "--tokens", str(args.tokens),
                                  "--vocab", str(args.vocab)], capture_output=True, text=True, check=True)
            runs[variant].append(json.loads(out.stdout))
    med = {v: {k: statistics.median(r[k] for r in rs) for k in ("peak_mib", "seconds", "loss")} for v, rs in runs.items()}
    ours, guide = med["closed_form"], med["materialised"]
    grad_mib = args.tokens * args.vocab * 4 / 2**20
    lines = [
        f"# Label-smoothing loss, forward + backward, {args.tokens} tokens x {args.vocab} vocab (fp32)",
        "",
        f"{datetime.date.today()} · {platform.processor() or platform.machine()} · torch {torch.__version__} · "
        f"{torch.get_num_threads()} threads · median of {args.repeats} interleaved runs · "
        f"`python benchmarks/loss_memory.py --tokens {args.tokens} --vocab {args.vocab} --repeats {args.repeats}`",
        "",
        "| implementation | peak memory above logits (MiB) | time (ms) | loss |",
        "|---|---:|---:|---:|",
        f"| guide-style, materialised target distribution | {guide['peak_mib']:.0f} | {guide['seconds'] * 1e3:.0f} | {guide['loss']:.6f} |",
        f"| `LabelSmoothingLoss` (closed form) | {ours['peak_mib']:.0f} | {ours['seconds'] * 1e3:.0f} | {ours['loss']:.6f} |",
        "",
        f"Ratio materialised / closed form: memory {guide['peak_mib'] / ours['peak_mib']:.2f}x, "
        f"time {guide['seconds'] / ours['seconds']:.2f}x. The logits' gradient itself "
        f"({grad_mib:.0f} MiB) is part of both peaks; beyond it the loss needs "
        f"{guide['peak_mib'] - grad_mib:.0f} MiB materialised vs {ours['peak_mib'] - grad_mib:.0f} MiB closed form "
        f"({(guide['peak_mib'] - grad_mib) / max(ours['peak_mib'] - grad_mib, 1):.0f}x).",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "loss_memory.md").write_text(report)


if __name__ == "__main__":
    main()
