"""Peak memory and time of the output projection + label-smoothing loss, forward + backward.

Three variants from the same decoder states ``(tokens, d_model)`` and projection ``(vocab, d_model)``:
the guide's (project to logits, then a full ``(tokens x vocab)`` smoothed target distribution
multiplied with ``log_softmax``), the project's closed-form :class:`LabelSmoothingLoss` on the
projected logits, and the project's :class:`ProjectedLabelSmoothingLoss`, which fuses the projection
so no logits tensor exists. Each variant runs in its own process; peak memory is the rise of the
process's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``) above the resident size once
the inputs exist: every temporary, the logits and the gradients count.

    python benchmarks/loss_memory.py [--tokens 4096] [--vocab 32000] [--d-model 512] [--repeats 3]
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


VARIANTS = {
    "materialised": "guide-style: logits, then materialised target distribution",
    "closed_form": "logits, then `LabelSmoothingLoss` (closed form)",
    "fused": "`ProjectedLabelSmoothingLoss` (projection fused, no logits)",
}


def child(variant: str, tokens: int, vocab: int, d_model: int) -> dict:
    from lightning_transformer import LabelSmoothingLoss, ProjectedLabelSmoothingLoss

    torch.manual_seed(0)
    states = torch.randn(tokens, d_model, requires_grad=True)
    weight = (torch.randn(vocab, d_model) * d_model**-0.5).requires_grad_()
    targets = torch.randint(1, vocab, (tokens,))
    targets[: tokens // 10] = 0
    if variant == "fused":
        loss_fn = ProjectedLabelSmoothingLoss(vocab, 0.1)
    elif variant == "closed_form":
        loss_fn = lambda h, w, t: LabelSmoothingLoss(vocab, 0.1)(h @ w.T, t)  # noqa: E731
    else:
        loss_fn = lambda h, w, t: guide_label_smoothing(h @ w.T, t, 0.1)  # noqa: E731
    loss_fn(states[:8], weight, targets[:8]).backward()  # warm up kernels and the allocator
    states.grad = weight.grad = None
    baseline = _kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    loss = loss_fn(states, weight, targets)
    loss.backward()
    seconds = time.perf_counter() - start
    return {"peak_mib": (_kib("VmHWM") - baseline) / 1024, "seconds": seconds, "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=VARIANTS)
    args = parser.parse_args()
    sizes = ["--tokens", str(args.tokens), "--vocab", str(args.vocab), "--d-model", str(args.d_model)]
    if args.child:
        print(json.dumps(child(args.child, args.tokens, args.vocab, args.d_model)))
        return
    runs = {variant: [] for variant in VARIANTS}
    for _ in range(args.repeats):  # interleaved A B C A B C
        for variant in runs:
            out = subprocess.run([sys.executable, __file__, "--child", variant, *sizes],
                                 capture_output=True, text=True, check=True)
            runs[variant].append(json.loads(out.stdout))
    med = {v: {k: statistics.median(r[k] for r in rs) for k in ("peak_mib", "seconds", "loss")}
           for v, rs in runs.items()}
    guide = med["materialised"]
    logits_mib = args.tokens * args.vocab * 4 / 2**20
    lines = [
        f"# Output projection + label-smoothing loss, forward + backward: {args.tokens} tokens x "
        f"{args.vocab} vocab, d_model {args.d_model} (fp32)",
        "",
        f"{datetime.date.today()} · {platform.processor() or platform.machine()} · torch {torch.__version__} · "
        f"{torch.get_num_threads()} threads · median of {args.repeats} interleaved runs, one process each · "
        f"`python benchmarks/loss_memory.py {' '.join(sizes)} --repeats {args.repeats}`",
        "",
        "| implementation | peak memory above inputs (MiB) | time (ms) | loss | memory vs guide | speed vs guide |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for variant, label in VARIANTS.items():
        row = med[variant]
        lines.append(f"| {label} | {row['peak_mib']:.0f} | {row['seconds'] * 1e3:.0f} | {row['loss']:.6f} | "
                     f"{guide['peak_mib'] / row['peak_mib']:.1f}x less | {guide['seconds'] / row['seconds']:.1f}x |")
    lines += ["", f"One fp32 logits tensor is {logits_mib:.0f} MiB; the unfused variants hold it and its gradient."]
    report = "\n".join(lines) + "\n"
    print(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "loss_memory.md").write_text(report)


if __name__ == "__main__":
    main()
