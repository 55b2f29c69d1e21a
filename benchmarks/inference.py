"""Inference engines side by side: one trained checkpoint translating Multi30k validation, text in, text out.

The same model goes through every engine: the project's PyTorch beam search (float32 and bf16
autocast), its CTranslate2 export in float32 and int8, and its Hugging Face ``MarianMTModel`` export
decoded by ``generate`` (Marian's own decoding of the same weights, so BLEU is comparable). Every
engine gets the same 1,014 source lines, beam size, batch size and threads, and is timed end to end:
tokenising, decoding and detokenising, after a warm-up pass (a server is warm: first-call allocations
and per-shape caches are not what it costs). Each engine runs in a process
of its own, as it would deployed (two OpenMP runtimes in one process, torch's and CTranslate2's,
slow each other down); engines take turns in interleaved rounds, and the table keeps each one's
fastest round. Target tokens are counted with the project's tokenizer on each engine's output.

    python benchmarks/inference.py CHECKPOINT [--data ../shared/data/multi30k] [--beam 4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ctranslate2  # noqa: F401  (before torch, as the package does: see lightning_transformer/__init__.py)
import sacrebleu
import torch

from lightning_transformer.cli.translate import load_translator, translate
from lightning_transformer.export.ct2 import export_ct2
from lightning_transformer.export.ct2_translator import CT2Translator
from lightning_transformer.export.hf import export_hf

RESULTS = Path(__file__).parent / "results"


def read_lines(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [line.rstrip("\n") for line in handle]


def cpu_name() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")),
                platform.processor())


def marian_engine(folder: Path, beam: int, batch_size: int):
    from transformers import AutoTokenizer, MarianMTModel

    model, tokenizer = MarianMTModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)

    def run(sentences: list[str]) -> list[str]:
        order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
        outputs = [""] * len(sentences)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                inputs = tokenizer([sentences[i] for i in chunk], return_tensors="pt", padding=True)
                generated = model.generate(**inputs, num_beams=beam, do_sample=False)
                for i, text in zip(chunk, tokenizer.batch_decode(generated, skip_special_tokens=True)):
                    outputs[i] = text
        return outputs

    return run


def pytorch_engine(model, tokenizer, beam: int, batch_size: int, bf16: bool):
    def run(sentences: list[str]) -> list[str]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return translate(model, tokenizer, sentences, beam, batch_size)

    return run


ENGINES = ("project PyTorch, float32", "project PyTorch, bf16 autocast", "CTranslate2 float32", "CTranslate2 int8",
           "HF Marian generate (same weights)")


def build_engine(name: str, checkpoint: str, workdir: Path, beam: int, batch_size: int):
    """``translate(sentences) -> texts`` for the engine ``name``, loaded from ``checkpoint`` or its exports."""
    if name.startswith("project"):
        model, tokenizer = load_translator(checkpoint)
        return pytorch_engine(model, tokenizer, beam, batch_size, bf16="bf16" in name)
    if name.startswith("CTranslate2"):
        translator = CT2Translator(workdir / ("ct2_int8" if "int8" in name else "ct2_float32"),
                                   intra_threads=torch.get_num_threads())
        return lambda sentences: translator.translate(sentences, beam, batch_size=batch_size)
    return marian_engine(workdir / "hf", beam, batch_size)


def time_engine(args) -> None:
    """One engine in this process: a warm-up pass over every source, then a timed one; seconds and outputs out."""
    sources = read_lines(Path(args.data) / f"val.{args.src}.gz")[: args.limit]
    run = build_engine(args.engine, args.checkpoint, Path(args.workdir), args.beam, args.batch_size)
    run(sources)
    start = time.perf_counter()
    outputs = run(sources)
    seconds = time.perf_counter() - start
    Path(args.result).write_text(json.dumps({"seconds": seconds, "outputs": outputs}), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--data", default=str(Path(__file__).parents[1] / "../shared/data/multi30k"))
    parser.add_argument("--src", default="en")
    parser.add_argument("--tgt", default="de")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="first N sentences only (a smoke run)")
    parser.add_argument("--output", default=str(RESULTS / "inference.md"))
    parser.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)  # one timed engine, in a subprocess
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        time_engine(args)
        return
    threads = torch.get_num_threads()
    sources = read_lines(Path(args.data) / f"val.{args.src}.gz")[: args.limit]
    references = read_lines(Path(args.data) / f"val.{args.tgt}.gz")[: args.limit]
    model, tokenizer = load_translator(args.checkpoint)
    workdir = Path(tempfile.mkdtemp(prefix="inference_"))
    export_ct2(model, tokenizer, workdir / "ct2_float32")
    export_ct2(model, tokenizer, workdir / "ct2_int8", quantization="int8")
    export_hf(model, tokenizer, workdir / "hf")
    seconds: dict[str, list[float]] = {name: [] for name in ENGINES}
    outputs: dict[str, list[str]] = {}
    for _ in range(args.rounds):
        for name in ENGINES:
            result = workdir / "result.json"
            command = [sys.executable, __file__, args.checkpoint, "--engine", name, "--workdir", str(workdir),
                       "--result", str(result), "--data", args.data, "--src", args.src, "--beam", str(args.beam),
                       "--batch-size", str(args.batch_size), *(["--limit", str(args.limit)] if args.limit else [])]
            subprocess.run(command, check=True, stderr=subprocess.DEVNULL)
            timed = json.loads(result.read_text(encoding="utf-8"))
            seconds[name].append(timed["seconds"])
            outputs[name] = timed["outputs"]
    rows = []
    for name in ENGINES:
        best = min(seconds[name])
        tokens = sum(len(ids) + 1 for ids in tokenizer.encode_batch(outputs[name]))  # + EOS
        bleu = sacrebleu.corpus_bleu(outputs[name], [references])
        rows.append(dict(engine=name, seconds=best, sentences_per_s=len(sources) / best, tokens_per_s=tokens / best,
                         bleu=bleu.score, chrf=sacrebleu.corpus_chrf(outputs[name], [references]).score))
    marian = next(r for r in rows if r["engine"].startswith("HF Marian"))
    header = (f"{datetime.date.today()} · {cpu_name()} · {threads} threads · torch {torch.__version__} · "
              f"{len(sources)} sentences of Multi30k val {args.src}→{args.tgt}, beam {args.beam}, batches of "
              f"{args.batch_size}, best of {args.rounds} interleaved rounds, each engine in its own process · "
              f"checkpoint `{Path(args.checkpoint).name}`")
    lines = [f"# Inference engines, text in and text out\n\n{header}\n",
             "| engine | seconds | sentences/s | target tokens/s | × Marian generate | sacreBLEU | chrF |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['seconds']:.2f} | {r['sentences_per_s']:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s'] / marian['tokens_per_s']:.2f}× | {r['bleu']:.2f} | {r['chrf']:.2f} |")
    lines.append(f"\nCommand: `python benchmarks/inference.py {args.checkpoint} --beam {args.beam} "
                 f"--rounds {args.rounds}`")
    text = "\n".join(lines) + "\n"
    print(text)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    output.with_suffix(".json").write_text(json.dumps({"header": header, "rows": rows}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
