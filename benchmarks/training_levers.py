"""Training-step levers on the small preset in bf16, side by side: autocast (the baseline), bf16 weights
with float32 masters (what ``BF16MasterWeights`` does), and ``torch.compile`` on padded or dynamic shapes.

Every variant is the project's step (shift, masks, forward, fused loss, backward, Adam) in a plain loop
over the same Multi30k batches, one step of each variant per batch in turn, fresh models from one
seed. Compilation happens on each variant's first steps (dropped, with the warm-up); its time is
reported apart. Prints a table and writes ``benchmarks/results/training_levers.{md,json}``::

    python benchmarks/training_levers.py --steps 20
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import PRESETS, ROOT, load_batches, target_tokens  # noqa: E402
from throughput_report import device_name  # noqa: E402

from lightning_transformer import Seq2SeqTransformer, tune_malloc  # noqa: E402
from lightning_transformer.data.tokenizer import PAD_ID  # noqa: E402

BUCKET = 16


def build(cfg) -> Seq2SeqTransformer:
    torch.manual_seed(0)
    return Seq2SeqTransformer(8000, 8000, cfg.d_model, cfg.heads, cfg.layers, cfg.layers, cfg.ffn,
                              share_embeddings=True, tie_output_embeddings=True).train()


def padded(batch: dict, length: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(src, tgt)`` with both padded to ``length`` columns (or to the next multiple of BUCKET)."""
    out = []
    for ids in (batch["src"], batch["tgt"]):
        target = length or -(-ids.size(1) // BUCKET) * BUCKET
        out.append(F.pad(ids, (0, target - ids.size(1)), value=PAD_ID))
    return out[0], out[1]


class Variant:
    """One way of running the project's training step."""

    def __init__(self, name: str, cfg, master: bool = False, compile_mode: str | None = None,
                 pad_to: int | None = None, bucket: bool = False) -> None:
        self.name, self.pad_to, self.bucket, self.master = name, pad_to, bucket, master
        self.model = build(cfg)
        if master:
            self.masters = [p.detach().float().clone().requires_grad_() for p in self.model.parameters()]
            self.model.to(torch.bfloat16)
        params = self.masters if master else list(self.model.parameters())
        self.optimizer = torch.optim.Adam(params, lr=1e-4, betas=(0.9, 0.98), eps=1e-9, fused=True)
        self.forward = self._loss
        if compile_mode:
            self.forward = torch.compile(self._loss, dynamic=compile_mode == "dynamic")
        self.seconds: list[float] = []
        self.first_seconds = 0.0

    def _loss(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return self.model.compute_loss(*self.model.teacher_force((src, tgt)))

    def step(self, batch: dict) -> float:
        src, tgt = padded(batch, self.pad_to) if (self.pad_to or self.bucket) else (batch["src"], batch["tgt"])
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not self.master):
            loss = self.forward(src, tgt)
        loss.backward()
        if self.master:
            with torch.no_grad():
                for p, m in zip(self.model.parameters(), self.masters):
                    m.grad = p.grad.float()
                    p.grad = None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.master:
            with torch.no_grad():
                for p, m in zip(self.model.parameters(), self.masters):
                    p.copy_(m)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "multi30k")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    tune_malloc()
    cfg = PRESETS["small"]
    batches, _ = load_batches(args.data, 64, args.warmup + args.steps, 1, "cpu")
    longest = max(max(b["src"].size(1), b["tgt"].size(1)) for b in batches)
    variants = [
        Variant("bf16-mixed autocast, eager (baseline)", cfg),
        Variant("bf16 weights + float32 masters, eager", cfg, master=True),
        Variant(f"bf16-mixed, eager, padded to multiples of {BUCKET}", cfg, bucket=True),
        Variant(f"bf16-mixed, torch.compile, padded to multiples of {BUCKET}", cfg, compile_mode="static",
                bucket=True),
        Variant(f"bf16-mixed, eager, every batch padded to {longest}", cfg, pad_to=longest),
        Variant(f"bf16-mixed, torch.compile, every batch padded to {longest}", cfg, compile_mode="static",
                pad_to=longest),
        Variant("bf16-mixed, torch.compile(dynamic=True), unpadded", cfg, compile_mode="dynamic"),
    ]
    first = {}
    for i, batch in enumerate(batches):
        for variant in variants:
            seconds = variant.step(batch)
            if i < args.warmup:
                first[variant.name] = first.get(variant.name, 0.0) + seconds
            else:
                variant.seconds.append(seconds)
        print(f"batch {i + 1}/{len(batches)}", flush=True)
    tokens = [target_tokens(b) for b in batches[args.warmup:]]
    base = statistics.median(t / s for t, s in zip(tokens, variants[0].seconds))
    rows = []
    for variant in variants:
        tok_s = statistics.median(t / s for t, s in zip(tokens, variant.seconds))
        rows.append({"variant": variant.name, "tok_s": tok_s, "ratio": tok_s / base,
                     "warmup_seconds": first[variant.name]})
    cpu = device_name("cpu")
    lines = [
        "# Training-step levers, small preset, bf16", "",
        f"{datetime.date.today()} · {cpu} · {torch.get_num_threads()} torch threads · torch {torch.__version__}", "",
        f"Command: `python benchmarks/training_levers.py --steps {args.steps}`", "",
        f"The project's step (forward, fused loss, backward, fused Adam) in a plain loop, {len(batches)} Multi30k "
        f"batches of 64 pairs, each variant one step per batch in turn; tok/s: median of non-pad target tokens / "
        f"step time over the last {args.steps} steps. The first {args.warmup} steps (compilation included) are "
        "not timed; their total is shown.", "",
        "| variant | train tok/s | × baseline | first steps, s |", "|---|---:|---:|---:|",
        *(f"| {r['variant']} | {r['tok_s']:,.0f} | {r['ratio']:.2f}× | {r['warmup_seconds']:.1f} |" for r in rows),
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "training_levers.md").write_text(report)
    (args.output_dir / "training_levers.json").write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
