"""Validation time of the demo-size model before and after evaluation's one-pass, gradient-free loss.

``Trainer.validate`` over the embedded corpus's validation split (1,000 pairs), batched as
``configs/demo.yaml`` does, loss and perplexity only (no BLEU), for two models with the same weights:

- *before*: evaluation as it was, emulated by a subclass: the fused loss runs twice (once for the
  loss, once for the NLL), and each run also accumulates the weight's gradient, as
  ``ctx.needs_input_grad`` asked for it (the weight is a parameter) even under ``inference_mode``;
- *after*: :class:`Seq2SeqTransformer` as it is: one pass, no gradient work.

Runs alternate (before, after, before, ...) so that load on the machine hits both alike.

    python benchmarks/validation_time.py [--repeats 3] [--precision bf16-mixed]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Trainer

from lightning_transformer import Seq2SeqTransformer, tune_malloc
from lightning_transformer.data import TranslationDataModule
from lightning_transformer.losses import _ProjectedSmoothedCrossEntropy

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"


class TwoPassEvaluation(Seq2SeqTransformer):
    """Evaluation before the fix. Overriding both hooks makes ``_evaluate`` call each, as it always did,
    and each hook calls the autograd function directly, as the loss module did whatever the grad mode."""

    def _fused(self, states, tgt_output):
        targets, criterion = tgt_output.reshape(-1), self.criterion
        loss, nll = _ProjectedSmoothedCrossEntropy.apply(states.reshape(-1, states.size(-1)),
                                                         self.transformer.generator.weight, targets,
                                                         criterion.smoothing, criterion.pad_token_id)
        count = (targets != criterion.pad_token_id).sum().clamp(min=1)
        return loss / count, nll / count

    def compute_loss(self, states, tgt_output):
        return self._fused(states, tgt_output)[0]

    def compute_nll(self, states, tgt_output):
        return self._fused(states, tgt_output)[1]


def cpu_name() -> str:
    fields = dict(line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout
                  .splitlines() if ":" in line)
    name = fields.get("Model name", "unknown CPU").strip()
    return f"{name} (family {fields.get('CPU family', '?').strip()}, model {fields.get('Model', '?').strip()})"


def validate_seconds(model: Seq2SeqTransformer, data: TranslationDataModule, precision: str) -> tuple[float, dict]:
    trainer = Trainer(accelerator="cpu", devices=1, precision=precision, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)
    start = time.perf_counter()
    metrics = trainer.validate(model, data, verbose=False)[0]
    return time.perf_counter() - start, metrics


def loss_seconds(before: TwoPassEvaluation, after: Seq2SeqTransformer, batches: list, precision: str,
                 repeats: int) -> dict[str, float]:
    """The evaluation loss alone, both ways, on every batch's decoder states: median seconds a pass."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision.startswith("bf16"))
    after.eval()  # no dropout in the decoder states, as in validation
    with torch.inference_mode(), autocast:
        inputs = []
        for batch in batches:
            tgt_input, tgt_output = after.shift_targets(batch["tgt"])
            src_mask, tgt_mask = after.make_masks(batch["src"], tgt_input)
            inputs.append((after.decode_states(tgt_input, after.encode(batch["src"], src_mask), tgt_mask, src_mask),
                           tgt_output))
        ways = {"before": lambda s, t: (before.compute_loss(s, t), before.compute_nll(s, t)),
                "after": lambda s, t: after.criterion(s, after.transformer.generator.weight, t, return_nll=True)}
        times = {name: [] for name in ways}
        for _ in range(repeats):
            for name, way in ways.items():
                start = time.perf_counter()
                for states, tgt_output in inputs:
                    way(states, tgt_output)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="bf16-mixed", help="demo.yaml trains and validates in bf16-mixed")
    args = parser.parse_args()
    tune_malloc()
    load = os.getloadavg()[0]
    config = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    data_args = config["data"]["init_args"]
    data = TranslationDataModule(**data_args)
    data.prepare_data()
    model_args = {**config["model"]["init_args"], "src_vocab_size": data.vocab_size, "tgt_vocab_size": data.vocab_size}
    torch.manual_seed(0)
    after = Seq2SeqTransformer(**model_args)
    before = TwoPassEvaluation(**model_args)
    before.load_state_dict(after.state_dict())
    validate_seconds(after, data, args.precision)  # warm-up: caches, allocator, kernels
    batches = list(data.val_dataloader())
    pairs, tokens = sum(len(b["src"]) for b in batches), sum(int((b["tgt"][:, 1:] != 0).sum()) for b in batches)
    runs = {"before": [], "after": []}
    for _ in range(args.repeats):
        for name, model in (("before", before), ("after", after)):
            runs[name].append(validate_seconds(model, data, args.precision))
    seconds = {name: statistics.median(s for s, _ in results) for name, results in runs.items()}
    loss_only = loss_seconds(before, after, batches, args.precision, args.repeats)
    metrics = {name: results[0][1] for name, results in runs.items()}
    ratio = seconds["before"] / seconds["after"]
    labels = {"before": "before: fused loss twice, each with the weight's gradient",
              "after": "after: one pass, no gradient work"}
    lines = [
        "# Validation time of the demo-size model: before and after the one-pass, gradient-free evaluation loss",
        "",
        f"{datetime.date.today()} · {cpu_name()} · torch {torch.__version__} · {torch.get_num_threads()} threads · "
        f"{args.precision} · load average {load:.1f} at start · `python benchmarks/validation_time.py --repeats "
        f"{args.repeats} --precision {args.precision}`",
        "",
        f"`Trainer.validate` over the embedded corpus's validation split ({pairs} pairs, {tokens} target tokens "
        f"with EOS), `configs/demo.yaml` model and batching (d_model {model_args['d_model']}, "
        f"{model_args['num_encoder_layers']}+{model_args['num_decoder_layers']} layers, vocabulary "
        f"{data.vocab_size}, max_tokens {data_args['max_tokens']}), loss and perplexity only (no BLEU); same "
        f"weights (random); median of {args.repeats} alternating runs after one warm-up run.",
        "",
        "| evaluation | validation (s) | its loss alone (s) | val/loss | val/nll |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, label in labels.items():
        lines.append(f"| {label} | {seconds[name]:.2f} | {loss_only[name]:.2f} | {metrics[name]['val/loss']:.6f} | "
                     f"{metrics[name]['val/nll']:.6f} |")
    loss_ratio = loss_only["before"] / loss_only["after"]
    lines += ["", f"Validation: **{ratio:.2f}x** faster after ({seconds['before']:.2f} s -> {seconds['after']:.2f} s). "
              f"The loss alone (timed apart on the same decoder states): {loss_ratio:.2f}x."]
    report = "\n".join(lines) + "\n"
    print(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "validation_time.md").write_text(report)


if __name__ == "__main__":
    main()
