"""The guide's out-of-memory levers at base size: activation checkpointing and 16-bit autocast.

Each configuration (precision x activation checkpointing) trains ``Seq2SeqTransformer`` at the
paper's base size in its own process, on the same synthetic batches shaped like Multi30k. Gradients
and Adam state are allocated by a first step and kept (``zero_grad(set_to_none=False)``), so the
peak above the resident size after that step (``VmHWM`` after ``clear_refs``) is what a step needs
on top of the model: activations and temporaries. Step time is the median of the timed steps.
Precisions: float32, bf16 and fp16 autocast (float32 weights, Lightning's ``bf16-mixed``/``16-mixed``)
and ``bf16-true`` (the whole model in bf16, Lightning's ``bf16-true``).

    python benchmarks/memory_levers.py [--batch-size 128] [--steps 4] [--repeats 2]
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
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from profile_step import PRESETS, synthetic_batch, train_step  # noqa: E402

from lightning_transformer import Seq2SeqTransformer, tune_malloc  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PRECISIONS = ("fp32", "bf16", "fp16", "bf16-true")
CONFIGS = [(precision, checkpointing) for precision in PRECISIONS for checkpointing in (False, True)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def child(precision: str, checkpointing: bool, batch_size: int, steps: int) -> dict:
    tune_malloc()
    torch.manual_seed(0)
    model = Seq2SeqTransformer(src_vocab_size=8000, tgt_vocab_size=8000, share_embeddings=True,
                               activation_checkpointing=checkpointing, **PRESETS["base"]).train()
    if precision == "bf16-true":  # Lightning's precision="bf16-true": bf16 weights, no float32 copy
        model = model.bfloat16()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-9, fused=True)
    generator = torch.Generator().manual_seed(0)
    batches = [synthetic_batch(batch_size, 8000, generator) for _ in range(steps + 1)]
    autocast = torch.autocast("cpu", dtype=DTYPES[precision]) if precision in DTYPES else nullcontext()
    seconds, baseline = [], 0
    for i, (src, tgt) in enumerate(batches):
        if i == 1:  # gradients and Adam state now exist
            baseline = _kib("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")
        start = time.perf_counter()
        train_step(model, optimizer, (src, tgt), autocast, set_to_none=False)
        seconds.append(time.perf_counter() - start)
    tokens = statistics.mean(int((tgt[:, 1:] != 0).sum()) for _, tgt in batches[1:])
    return {"peak_mib": (_kib("VmHWM") - baseline) / 1024, "step_s": statistics.median(seconds[1:]),
            "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("PRECISION", "CHECKPOINTING"))
    args = parser.parse_args()
    sizes = ["--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1] == "1", args.batch_size, args.steps)))
        return
    runs = {config: [] for config in CONFIGS}
    for _ in range(args.repeats):  # interleaved, one process each
        for precision, checkpointing in CONFIGS:
            out = subprocess.run([sys.executable, __file__, "--child", precision, str(int(checkpointing)), *sizes],
                                 capture_output=True, text=True, check=True)
            runs[precision, checkpointing].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {c: {k: statistics.median(r[k] for r in rs) for k in ("peak_mib", "step_s", "tokens")}
           for c, rs in runs.items()}
    fp32 = med["fp32", False]
    lines = [
        f"# Memory levers at base size (d_model 512, 6+6 layers, vocab 8k), batch {args.batch_size} pairs "
        f"(~{fp32['tokens']:.0f} target tokens)",
        "",
        f"{datetime.date.today()} · {platform.processor() or platform.machine()} · torch {torch.__version__} · "
        f"{torch.get_num_threads()} threads · median of {args.repeats} interleaved runs, one process each · "
        f"`python benchmarks/memory_levers.py {' '.join(sizes)} --repeats {args.repeats}`",
        "",
        "Peak: memory a training step needs above the model, its gradients and Adam state (activations "
        "and temporaries).",
        "",
        "| precision | activation checkpointing | peak above model+grads+Adam (MiB) | vs fp32 | step (s) | vs fp32 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (precision, checkpointing), row in med.items():
        lines.append(f"| {precision} | {'on' if checkpointing else 'off'} | {row['peak_mib']:.0f} | "
                     f"{row['peak_mib'] / fp32['peak_mib']:.2f}x | {row['step_s']:.2f} | "
                     f"{row['step_s'] / fp32['step_s']:.2f}x |")
    lines.append("")
    for precision in PRECISIONS:
        off, on = med[precision, False], med[precision, True]
        lines.append(f"- {precision}: checkpointing saves {1 - on['peak_mib'] / off['peak_mib']:.0%} of the step's "
                     f"memory for {on['step_s'] / off['step_s'] - 1:+.0%} step time.")
    report = "\n".join(lines) + "\n"
    print(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory_levers.md").write_text(report)


if __name__ == "__main__":
    main()
