"""Summary and Markdown report of ``benchmarks/throughput.py``'s raw measurements."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
from importlib.metadata import version
from pathlib import Path

import torch

from lightning_transformer.nn.cpu_choices import cpu_name

NAMES = {"project": "this project (`Seq2SeqTransformer`, Lightning Trainer)",
         "guide": "guide-style baseline (`benchmarks/guide_baseline.py`)",
         "marian": "Hugging Face `MarianMTModel`"}
ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "GLIBC_TUNABLES", "CUDA_VISIBLE_DEVICES")
GOALS = (("train_tok_s", "marian", 2.0), ("train_tok_s", "guide", 3.0), ("beam4_tok_s", "marian", 2.0))


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_name()}, {os.cpu_count()} logical CPUs"


def environment(device: str) -> dict:
    return {
        "date": datetime.date.today().isoformat(),
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "versions": {name: version(name) for name in ("torch", "lightning", "transformers")},
        "python": platform.python_version(),
        "env": {name: os.environ[name] for name in ENV_VARS if name in os.environ},
    }


def summarise(results: dict) -> dict:
    """Per precision and implementation: the medians and means the table shows."""
    warmup = results["args"]["warmup"]
    tokens, flops = results["step_tokens"][warmup:], results["step_flops"][warmup:]
    summary = {}
    for precision, run in results["precisions"].items():
        ceiling = run["ceiling_gflops"] * 1e9
        rows = {}
        for impl, seconds in run["step_seconds"].items():
            seconds = seconds[warmup:]
            row = {
                "train_tok_s": statistics.median(t / s for t, s in zip(tokens, seconds)),
                "mfu": statistics.median(f / s for f, s in zip(flops, seconds)) / ceiling,
                "peak_mib": run["peak_mib"][impl],
            }
            for mode in ("greedy", "beam4"):
                decoded = run["decoding"].get(f"{impl}/{mode}")
                if decoded:
                    row[f"{mode}_tok_s"] = statistics.median(
                        t / s for t, s in zip(decoded["tokens"], decoded["seconds"]))
                    row[f"{mode}_length"] = statistics.mean(decoded["lengths"])
            rows[impl] = row
        summary[precision] = rows
    return summary


def _num(value: float | None, fmt: str = ",.0f") -> str:
    return "—" if value is None else format(value, fmt)


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None else f"{a / b:.2f}×"


def header(results: dict, env: dict, argv: list[str]) -> list[str]:
    args, cfg = results["args"], results["config"]
    warmup, steps = args["warmup"], args["steps"]
    tokens = statistics.mean(results["step_tokens"][warmup:])
    gflop = statistics.mean(results["step_flops"][warmup:]) / 1e9
    ceilings = ", ".join(f"{p} {run['ceiling_gflops']:,.0f} GFLOP/s" for p, run in results["precisions"].items())
    params = ", ".join(f"{impl} {n:,}" for impl, n in results["parameters"].items())
    versions = " · ".join(f"{name} {v}" for name, v in env["versions"].items())
    env_vars = " ".join(f"{k}={v}" for k, v in env["env"].items())
    sentences = args["decode_sentences"]
    return [
        f"# Training and decoding throughput, {args['preset']} preset",
        "",
        f"{env['date']} · {env['device']} · {env['threads']} torch threads · {versions} · Python {env['python']}",
        "",
        f"Command: `{(env_vars + ' ') if env_vars else ''}python benchmarks/throughput.py {' '.join(argv)}`",
        "",
        f"- **Same for all three:** d_model {cfg['d_model']}, {cfg['heads']} heads, ffn {cfg['ffn']}, "
        f"{cfg['layers']}+{cfg['layers']} layers, joint BPE vocabulary of {results['vocab']:,} (Multi30k; the base "
        "preset keeps it, the paper had 37k), one embedding table for source and target tied to the output "
        f"projection (trainable parameters: {params}); dropout {results['dropout']['dropout']} on embeddings and "
        f"sub-layer outputs, {results['dropout']['attention_dropout']} on attention probabilities, "
        f"{results['dropout']['activation_dropout']} after the ReLU (the project's and fairseq's defaults; the guide "
        "has 0.1 on all three); Adam β (0.9, 0.98), ε 1e-9, Noam schedule with 4000 warm-up steps, no clipping; "
        "label smoothing 0.1.",
        "- **Kept as each implementation has it:** project and Marian are post-norm, the guide pre-norm with its own "
        "LayerNorm; the project's loss is the one its `training_step` uses (label smoothing without a "
        "`tokens × vocab` target tensor), the guide's materialises the smoothed distribution for `KLDivLoss`, "
        "Marian's is `F.cross_entropy(label_smoothing=0.1)` (ε/V convention); Marian's attention implementation: "
        f"`{results['attention']['marian']}`.",
        "- **Allocator:** " + ("glibc malloc tuned by `lightning_transformer.tune_malloc` (as the project's CLI does) "
                               "for the whole run, so for all three alike." if args.get("tune_malloc") else
                               "glibc defaults for all three (the project's CLI would tune malloc; "
                               "see `throughput_*_tuned_malloc.md`)."),
        f"- **Training:** the first {warmup + steps} Multi30k en→de training batches of {args['batch_size']} pairs "
        f"(seed 0, {tokens:.0f} non-pad target tokens a batch on average), one list, same order for all; each batch "
        "runs a project step (a `lightning.Trainer` step, timed from `on_train_batch_start` to "
        "`on_train_batch_end`: forward, backward, Adam, schedule"
        + ("; in bf16 through the `BF16MasterWeights` plugin: bf16 weights and activations, float32 master "
           "weights in Adam, where the peers use autocast" if args.get("master_weights") else "")
        + "), then a guide step, then a Marian step (plain "
        f"loops). Fresh models per precision. tok/s: median over the last {steps} steps ({warmup} warm-up step(s) "
        "dropped) of non-pad target tokens / step time.",
        f"- **MFU:** matmul FLOPs of forward + backward, counted with `FlopCounterMode` on the project's model for "
        f"each batch shape (padding included; {gflop:.1f} GFLOP a step on average) and used for all three, over "
        f"step time, over the matmul ceiling measured in this run ({args['matmul_size']}³: {ceilings}).",
        f"- **Peak memory:** one process per implementation and precision runs {args['memory_steps']} training "
        "steps; peak above the memory held once the model and optimizer exist (gradients, Adam state, "
        "activations, temporaries): `VmHWM` after `clear_refs` on CPU, `max_memory_allocated` on CUDA.",
        f"- **Decoding:** {sentences} validation sentences (evenly spaced length-sorted batches of up to "
        f"{args['batch_size']}) × {args['rounds']} round(s), interleaved batch by batch, eval mode under "
        f"`inference_mode`; every implementation stops at {args['max_new_tokens']} tokens a sentence, EOS "
        "included, and never emits padding or BOS. tok/s: generated tokens up to and including EOS / seconds, "
        "median over rounds. Random weights rarely produce EOS, so lengths sit near the limit: mean length shown. "
        "Project: `greedy_decode` / `beam_search` (key/value cache, GNMT α 0.6); guide: greedy, the whole prefix "
        "through the decoder every step (no cache, no beam search); Marian: `generate(num_beams=1|4, "
        "early_stopping=True, length_penalty=0.6)`.",
    ]


def table(summary: dict) -> list[str]:
    lines = ["| implementation | precision | train tok/s | peak MiB | MFU % | greedy tok/s | beam 4 tok/s | "
             "mean length greedy / beam 4 |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for precision, rows in summary.items():
        for impl, row in rows.items():
            lengths = f"{_num(row.get('greedy_length'), '.1f')} / {_num(row.get('beam4_length'), '.1f')}"
            lines.append(
                f"| {NAMES[impl]} | {precision} | {_num(row['train_tok_s'])} | {_num(row['peak_mib'])} | "
                f"{_num(row['mfu'] * 100, '.1f')} | {_num(row.get('greedy_tok_s'))} | "
                f"{_num(row.get('beam4_tok_s'))} | {lengths} |")
    return lines


def ratios(summary: dict, preset: str) -> list[str]:
    lines = ["## Ratios, project / peer", "",
             "Above 1 the project is faster (or, for peak memory, needs more memory).", "",
             "| precision | peer | train tok/s | peak memory | MFU | greedy tok/s | beam 4 tok/s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    keys = ("train_tok_s", "peak_mib", "mfu", "greedy_tok_s", "beam4_tok_s")
    for precision, rows in summary.items():
        for peer in ("marian", "guide"):
            cells = " | ".join(_ratio(rows["project"].get(k), rows[peer].get(k)) for k in keys)
            lines.append(f"| {precision} | {peer} | {cells} |")
    if preset == "small" and "bf16" in summary:
        rows = summary["bf16"]
        goals = [f"{key.split('_')[0]} ≥ {target:g}× {peer}: {_ratio(rows['project'][key], rows[peer][key])} "
                 f"({'met' if rows['project'][key] >= target * rows[peer][key] else 'not met'})"
                 for key, peer, target in GOALS]
        lines += ["", "Goals of issue 5 (small preset, bf16, tokens/s): " + "; ".join(goals) + "."]
    return lines


def write_report(results: dict, output_dir: Path | None, argv: list[str]) -> str:
    """Markdown report of ``results``; with ``output_dir``, also ``throughput_<preset>.md`` and ``.json`` there."""
    env = environment(results["args"]["device"])
    summary = summarise(results)
    report = "\n".join([*header(results, env, argv), "", *table(summary), "",
                        *ratios(summary, results["args"]["preset"])]) + "\n"
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        tuned = "_tuned_malloc" if results["args"].get("tune_malloc") else ""
        tuned += "_master_weights" if results["args"].get("master_weights") else ""
        stem = output_dir / f"throughput_{results['args']['preset']}{tuned}"
        stem.with_suffix(".md").write_text(report)
        stem.with_suffix(".json").write_text(json.dumps({**results, "environment": env, "summary": summary},
                                                         indent=1))
    return report
