"""Attention kernels side by side: SDPA's default and math kernels vs. ``matmul_attention``.

Times forward + backward (training) and forward alone under ``inference_mode`` for self-attention
shapes ``(B, H, T, 64)`` at a fixed token budget, causal boolean mask, in float32 and bfloat16. The
project picks its path per device, dtype, grad mode and length from these numbers
(``lightning_transformer.nn.layers.use_matmul_attention``).

    python benchmarks/attention_paths.py [--tokens 2048] [--heads 4] [--repeats 20]
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_transformer.nn.cpu_choices import cpu_name, median_seconds
from lightning_transformer.nn.layers import matmul_attention

RESULTS = Path(__file__).parent / "results"
LENGTHS = (16, 32, 64, 128, 256, 512)


def sdpa(backend: SDPBackend | None):
    def attend(q, k, v, mask):
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return attend


PATHS = {"SDPA default": sdpa(None), "SDPA math": sdpa(SDPBackend.MATH), "matmul_attention": matmul_attention}



def measure(path, length: int, dtype: torch.dtype, training: bool, args) -> float:
    batch = max(1, args.tokens // length)
    q, k, v = (torch.randn(batch, args.heads, length, 64, dtype=dtype, requires_grad=training) for _ in range(3))
    mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None].expand(batch, 1, length, length)

    def run():
        if training:
            path(q, k, v, mask).float().sum().backward()
        else:
            with torch.inference_mode():
                path(q, k, v, mask)

    return median_seconds(run, args.repeats) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="batch x length, kept fixed across lengths")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--output", type=Path, default=RESULTS / "attention_paths.md")
    args = parser.parse_args()
    lines = [
        f"# Attention paths: ms per call, {args.tokens} query tokens (batch = tokens / length), {args.heads} heads "
        "of 64, causal bool mask",
        "",
        f"{datetime.date.today()} · {cpu_name()} · torch {torch.__version__} · "
        f"{torch.get_num_threads()} threads · median of {args.repeats} · "
        f"`python benchmarks/attention_paths.py --tokens {args.tokens} --heads {args.heads} --repeats {args.repeats}`",
        "",
        "| mode | dtype | length | " + " | ".join(PATHS) + " | fastest |",
        "|---|---|---:|" + "---:|" * (len(PATHS) + 1),
    ]
    for training in (True, False):
        for dtype in (torch.float32, torch.bfloat16):
            for length in LENGTHS:
                times = {name: measure(path, length, dtype, training, args) for name, path in PATHS.items()}
                cells = " | ".join(f"{ms:.2f}" for ms in times.values())
                mode = "forward + backward" if training else "forward, inference"
                lines.append(f"| {mode} | {str(dtype).removeprefix('torch.')} | {length} | {cells} | "
                             f"{min(times, key=times.get)} |")
    report = "\n".join(lines) + "\n"
    print(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)


if __name__ == "__main__":
    main()
