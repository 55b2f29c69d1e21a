"""Training and decoding throughput, side by side: this project, the guide-style baseline, Hugging Face Marian.

Three implementations of the same encoder-decoder (same dimensions, 8k joint BPE vocabulary, shared
and tied embeddings, dropout, batches, Adam + Noam schedule) train on the same list of Multi30k
en->de batches, interleaved step by step (project, guide, Marian, project, ...), then decode the same
validation sentences, interleaved batch by batch, in fp32 and in bf16 autocast:

- project: ``Seq2SeqTransformer`` through a real ``lightning.Trainer``; a callback times each step
  from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward, Adam, schedule) and
  then runs one timed step of each peer on the same batch; decoding by ``greedy_decode``/``beam_search``;
- guide: ``benchmarks/guide_baseline.py`` in a plain PyTorch loop; greedy decoding without a cache;
- marian: ``MarianMTModel`` from a ``MarianConfig`` of the same size (random weights, no download),
  ``F.cross_entropy(label_smoothing=0.1)``, decoding by ``generate``.

Reported: non-pad target tokens per second in training (median over steps after warm-up), peak
memory of a few training steps (each implementation and precision in its own process), model FLOP
utilisation against a matmul ceiling measured in the same run, and generated tokens per second for
greedy and beam-4 decoding. The table goes to ``benchmarks/results/throughput_<preset>.md``, raw
numbers to ``.json`` next to it.

    python benchmarks/throughput.py --preset small                 # both precisions, defaults below
    python benchmarks/throughput.py --preset base --precision bf16 --steps 6
    OMP_NUM_THREADS=1 python benchmarks/throughput.py --quick --output-dir /tmp/throughput   # smoke run
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import re
import statistics
import subprocess
import sys
import time
import warnings
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import guide_baseline
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer
from throughput_report import write_report
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from transformers import MarianConfig, MarianMTModel
from transformers.utils import logging as hf_logging

from lightning_transformer import BF16MasterWeights, Seq2SeqTransformer, beam_search, greedy_decode, tune_malloc
from lightning_transformer.data import TranslationDataModule
from lightning_transformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from lightning_transformer.schedules import noam_schedule

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("project", "guide", "marian")
VOCAB = 8000
PRESETS = {
    "small": SimpleNamespace(d_model=256, heads=4, ffn=1024, layers=3),
    "base": SimpleNamespace(d_model=512, heads=8, ffn=2048, layers=6),
}
# Run lengths per preset (flags override them); base steps take seconds each in fp32 on a 2-core CPU.
# max_new_tokens: decoding limit, EOS included, about 1.5x the mean Multi30k reference (~16 tokens).
RUN_DEFAULTS = {
    "small": dict(warmup=3, steps=20, rounds=3, decode_sentences=256, max_new_tokens=24, memory_steps=3,
                  matmul_size=2048),
    "base": dict(warmup=2, steps=6, rounds=1, decode_sentences=64, max_new_tokens=24, memory_steps=2,
                 matmul_size=2048),
}
QUICK = dict(warmup=1, steps=2, rounds=1, decode_sentences=8, max_new_tokens=6, memory_steps=2, matmul_size=512)
# The same regularisation for all three: the project's and fairseq's defaults.
DROPOUT = dict(dropout=0.1, attention_dropout=0.0, activation_dropout=0.0)
ADAM = dict(lr=1.0, betas=(0.9, 0.98), eps=1e-9)  # lr 1.0: the Noam LambdaLR supplies the rate
WARMUP_STEPS = 4000
LABEL_SMOOTHING = 0.1
BEAM, LENGTH_PENALTY = 4, 0.6
TRAINER_PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed"}
DECODES = (("project", "greedy"), ("guide", "greedy"), ("marian", "greedy"),
           ("project", "beam4"), ("marian", "beam4"))


# ----- models -----------------------------------------------------------------------------------
def build_model(impl: str, cfg: SimpleNamespace, device: str) -> torch.nn.Module:
    """The ``impl`` model at size ``cfg``, randomly initialised from seed 0."""
    torch.manual_seed(0)
    if impl == "project":
        model = Seq2SeqTransformer(
            VOCAB, VOCAB, cfg.d_model, cfg.heads, cfg.layers, cfg.layers, cfg.ffn, **DROPOUT,
            share_embeddings=True, tie_output_embeddings=True, label_smoothing=LABEL_SMOOTHING,
            warmup_steps=WARMUP_STEPS, betas=ADAM["betas"], eps=ADAM["eps"],
        )
    elif impl == "guide":
        model = guide_baseline.make_model(VOCAB, cfg.layers, cfg.d_model, cfg.ffn, cfg.heads, **DROPOUT)
    else:
        model = MarianMTModel(MarianConfig(
            vocab_size=VOCAB, d_model=cfg.d_model, encoder_layers=cfg.layers, decoder_layers=cfg.layers,
            encoder_attention_heads=cfg.heads, decoder_attention_heads=cfg.heads, encoder_ffn_dim=cfg.ffn,
            decoder_ffn_dim=cfg.ffn, activation_function="relu", **DROPOUT, scale_embedding=True,
            max_position_embeddings=1024, pad_token_id=PAD_ID, eos_token_id=EOS_ID, forced_eos_token_id=EOS_ID,
            decoder_start_token_id=BOS_ID, share_encoder_decoder_embeddings=True, tie_word_embeddings=True,
        ))
    return model.to(device)


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)  # shared tensors once


def guide_loss(criterion: guide_baseline.LabelSmoothing, model, src, tgt) -> torch.Tensor:
    return guide_baseline.loss_compute(model, criterion, src, tgt[:, :-1], tgt[:, 1:], PAD_ID)


def marian_loss(model: MarianMTModel, src, tgt) -> torch.Tensor:
    # Decoder padding needs no mask: it only follows real tokens, and its positions are ignored.
    logits = model(input_ids=src, attention_mask=(src != PAD_ID).long(), decoder_input_ids=tgt[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten(), ignore_index=PAD_ID,
                           label_smoothing=LABEL_SMOOTHING)


class PlainLoop:
    """A plain PyTorch training step: forward and loss under autocast, backward, Adam, Noam schedule."""

    def __init__(self, impl: str, cfg: SimpleNamespace, precision: str, device: str) -> None:
        self.model = build_model(impl, cfg, device).train()
        self.loss = (marian_loss if impl == "marian" else
                     partial(guide_loss, guide_baseline.LabelSmoothing(VOCAB, PAD_ID, LABEL_SMOOTHING)))
        self.optimizer = torch.optim.Adam(self.model.parameters(), **ADAM)
        self.scheduler = noam_schedule(self.optimizer, cfg.d_model, WARMUP_STEPS)
        self.autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(self, batch: dict) -> None:
        with torch.enable_grad(), self.autocast:
            loss = self.loss(self.model, batch["src"], batch["tgt"])
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()


# ----- data -------------------------------------------------------------------------------------
def load_batches(data: Path, batch_size: int, n_train: int, n_decode: int, device: str) -> tuple[list, list]:
    """The first ``n_train`` shuffled training batches and ``n_decode`` validation sources, on ``device``.

    Batches come from the project's ``TranslationDataModule`` (joint 8k BPE, length-bucketed batches of
    ``batch_size`` pairs, seed 0), so every process of a run sees the same list. Validation batches are
    sorted by length; evenly spaced ones are taken so that short and long sentences are both decoded.
    """
    module = TranslationDataModule(dataset=str(data), format="text", src_lang="en", tgt_lang="de",
                                   vocab_size=VOCAB, max_tokens=None, batch_size=batch_size, max_length=128)
    module.prepare_data()
    module.setup("fit")
    train = [{k: v.to(device) for k, v in b.items()} for b in itertools.islice(module.train_dataloader(), n_train)]
    val = [b["src"] for b in module.val_dataloader()]
    chosen = val[:: max(1, len(val) // math.ceil(n_decode / batch_size))]
    sources, left = [], n_decode
    for src in chosen:
        if left <= 0:
            break
        src = src[:left]
        sources.append(src[:, : int((src != PAD_ID).sum(1).max())].to(device))  # drop all-padding columns
        left -= src.size(0)
    return train, sources


def target_tokens(batch: dict) -> int:
    """Non-pad tokens the step predicts (the target shifted left)."""
    return int((batch["tgt"][:, 1:] != PAD_ID).sum())


# ----- timing -----------------------------------------------------------------------------------
def now(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def make_trainer(precision: str, device: str, steps: int, callback: Callback, master: bool = False) -> Trainer:
    """The project's Trainer; ``master``: bf16 through :class:`BF16MasterWeights` instead of ``bf16-mixed``."""
    master = master and precision == "bf16"
    return Trainer(
        accelerator="gpu" if device == "cuda" else "cpu", devices=1,
        precision=None if master else TRAINER_PRECISION[precision],
        plugins=[BF16MasterWeights(fall_back_to_float32=False)] if master else None,
        max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False, callbacks=[callback],
    )


class Interleave(Callback):
    """Times each of the project's Trainer steps, then one step of every peer loop on the same batch."""

    def __init__(self, peers: dict[str, PlainLoop], device: str) -> None:
        self.peers, self.device = peers, device
        self.seconds: dict[str, list[float]] = {name: [] for name in ("project", *peers)}
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = now(self.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds["project"].append(now(self.device) - self._start)
        for name, loop in self.peers.items():
            start = now(self.device)
            loop.step(batch)
            self.seconds[name].append(now(self.device) - start)


def train_interleaved(cfg: SimpleNamespace, precision: str, batches: list, device: str,
                      master: bool = False) -> dict[str, list[float]]:
    """Seconds per training step of each implementation, fresh models, one step each per batch in turn."""
    timer = Interleave({name: PlainLoop(name, cfg, precision, device) for name in ("guide", "marian")}, device)
    trainer = make_trainer(precision, device, len(batches), timer, master)
    trainer.fit(build_model("project", cfg, device), DataLoader(batches, batch_size=None))
    return timer.seconds


def matmul_ceiling(precision: str, device: str, size: int, repeats: int = 10) -> float:
    """GFLOP/s of a ``size``-cubed matmul in the precision's dtype: median of ``repeats`` after one warm-up."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    seconds = []
    for _ in range(repeats + 1):
        start = now(device)
        torch.mm(a, b)
        seconds.append(now(device) - start)
    return 2 * size**3 / statistics.median(seconds[1:]) / 1e9


def training_flops(cfg: SimpleNamespace, batches: list) -> list[int]:
    """Model FLOPs of one forward + backward per batch, counted on the project's model.

    Counted once per batch shape on the meta device (no compute), through the model's public
    ``forward`` and a plain cross-entropy: the matmuls of the model, not a loss's own recomputation.
    Padded positions are included, as they are computed. The math attention kernel is forced because
    ``FlopCounterMode`` has no formula for the CPU flash kernel.
    """
    with torch.device("meta"):
        model = build_model("project", cfg, "meta")
    counts: dict[tuple, int] = {}
    for batch in batches:
        shape = (tuple(batch["src"].shape), tuple(batch["tgt"].shape))
        if shape not in counts:
            src, tgt = (torch.ones(s, dtype=torch.long, device="meta") for s in shape)
            with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
                logits = model(src, tgt[:, :-1])
                F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten()).backward()
            counts[shape] = counter.get_total_flops()
    return [counts[(tuple(b["src"].shape), tuple(b["tgt"].shape))] for b in batches]


# ----- peak memory (one process per implementation and precision) -------------------------------
def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


class PeakMemory(Callback):
    """Peak memory above the level at :meth:`start`: ``VmHWM`` on CPU, the allocator's peak on CUDA.

    As a callback it starts at the first training batch (after the Trainer's set-up) and stops at the
    end of training.
    """

    def __init__(self, device: str) -> None:
        self.device, self.baseline, self.peak_mib = device, 0, float("nan")

    def start(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
        else:
            self.baseline = _status_kib("VmRSS") * 1024
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS

    def stop(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _status_kib("VmHWM") * 1024
        self.peak_mib = (peak - self.baseline) / 2**20

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.start()

    def on_train_end(self, trainer, pl_module) -> None:
        self.stop()


def memory_child(impl: str, cfg: SimpleNamespace, precision: str, batches: list, device: str,
                 master: bool = False) -> float:
    """Peak MiB of ``len(batches)`` training steps above the memory held once model and optimizer exist."""
    probe = PeakMemory(device)
    if impl == "project":
        make_trainer(precision, device, len(batches), probe, master).fit(
            build_model("project", cfg, device), DataLoader(batches, batch_size=None))
    else:
        loop = PlainLoop(impl, cfg, precision, device)
        probe.start()
        for batch in batches:
            loop.step(batch)
        probe.stop()
    return probe.peak_mib


def measure_memory(impl: str, precision: str, args: argparse.Namespace) -> float:
    """Runs :func:`memory_child` in a fresh interpreter, so no other model's memory is counted."""
    command = [sys.executable, __file__, "--memory-child", impl, "--preset", args.preset, "--precision", precision,
               "--batch-size", str(args.batch_size), "--memory-steps", str(args.memory_steps),
               "--device", args.device, "--data", str(args.data), *(["--tune-malloc"] if args.tune_malloc else []),
               *(["--master-weights"] if args.master_weights else [])]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory child {impl} {precision} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


# ----- decoding ---------------------------------------------------------------------------------
def tokens_to_eos(ids: torch.Tensor) -> list[int]:
    """Generated tokens per row of ``(B, L)`` ids (no BOS): up to and including the first EOS, else all."""
    is_eos = ids == EOS_ID
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, ids.size(1))
    return first.tolist()


def decode(impl: str, mode: str, model, src: torch.Tensor, max_len: int) -> list[int]:
    """Decodes ``src`` ``(B, S)`` with at most ``max_len`` tokens a sentence, EOS included; returns lengths."""
    if impl == "project" and mode == "greedy":
        return [len(ids) + 1 for ids in greedy_decode(model, src, max_len, PAD_ID, BOS_ID, EOS_ID)]  # + EOS
    if impl == "project":
        # a = 0, b = max_len: the same fixed limit for every sentence.
        hyps = beam_search(model, src, BEAM, 0.0, max_len, PAD_ID, BOS_ID, EOS_ID, LENGTH_PENALTY)
        return [len(best[0].tokens) + 1 for best in hyps]
    if impl == "guide":
        return tokens_to_eos(guide_baseline.greedy_decode(model, src, max_len, PAD_ID, BOS_ID, EOS_ID))
    beams = dict(num_beams=BEAM, early_stopping=True, length_penalty=LENGTH_PENALTY) if mode == "beam4" else {}
    # Padding and BOS are never chosen, as in the project's decoders; forced_eos ends at the limit.
    out = model.generate(input_ids=src, attention_mask=(src != PAD_ID).long(), max_new_tokens=max_len,
                         do_sample=False, suppress_tokens=[PAD_ID, BOS_ID], **beams)
    return tokens_to_eos(out[:, 1:])


def decode_interleaved(models: dict, sources: list, precision: str, args: argparse.Namespace) -> dict:
    """Tokens and seconds per round for each (implementation, mode), interleaved batch by batch."""
    runs = {key: {"tokens": [0] * args.rounds, "seconds": [0.0] * args.rounds, "lengths": []} for key in DECODES}
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.inference_mode(), autocast:
        for impl, mode in DECODES:  # warm-up: first-call allocations and kernel selection
            decode(impl, mode, models[impl], sources[0][:2], 2)
        for round_, src in itertools.product(range(args.rounds), sources):
            for impl, mode in DECODES:
                start = now(args.device)
                lengths = decode(impl, mode, models[impl], src, args.max_new_tokens)
                runs[impl, mode]["seconds"][round_] += now(args.device) - start
                runs[impl, mode]["tokens"][round_] += sum(lengths)
                runs[impl, mode]["lengths"] += lengths
    return {f"{impl}/{mode}": run for (impl, mode), run in runs.items()}


# ----- driver -----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog=f"Defaults per preset: {RUN_DEFAULTS}; --quick: {QUICK}.")
    parser.add_argument("--preset", choices=PRESETS, default="small")
    parser.add_argument("--precision", nargs="+", choices=TRAINER_PRECISION, default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, help="timed training steps per implementation and precision")
    parser.add_argument("--warmup", type=int, help="training steps run first and not timed")
    parser.add_argument("--rounds", type=int, help="passes over the decoding sentences; the median is reported")
    parser.add_argument("--batch-size", type=int, default=64, help="sentence pairs per batch")
    parser.add_argument("--decode-sentences", type=int, help="validation sentences decoded per round")
    parser.add_argument("--max-new-tokens", type=int, help="decoding limit per sentence, EOS included")
    parser.add_argument("--memory-steps", type=int, help="training steps of each peak-memory process")
    parser.add_argument("--matmul-size", type=int, help="side of the square matmul of the ceiling")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "multi30k")
    parser.add_argument("--output-dir", type=Path, help="default benchmarks/results; --quick writes only here")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run")
    parser.add_argument("--tune-malloc", action="store_true",
                        help="apply lightning_transformer.tune_malloc (as the CLI does) to the whole run, "
                             "so to all three implementations alike")
    parser.add_argument("--master-weights", action="store_true",
                        help="train the project in bf16 with BF16MasterWeights instead of bf16-mixed autocast")
    parser.add_argument("--memory-child", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and args.matmul_size is None:
        args.matmul_size = 8192  # a 2048-cubed matmul is too short on a GPU to reach its peak
    for key, value in {**RUN_DEFAULTS[args.preset], **(QUICK if args.quick else {})}.items():
        if getattr(args, key) is None:  # flags given explicitly win
            setattr(args, key, value)
    if args.output_dir is None and not args.quick:
        args.output_dir = ROOT / "benchmarks" / "results"
    return args


def quiet() -> None:
    """Silences the Trainer's and transformers' informational chatter on stdout/stderr."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()
    for message in ("does not have many workers", "but have no `val_dataloader`", r"isinstance\(treespec, LeafSpec\)"):
        warnings.filterwarnings("ignore", message=".*" + message)


def run_precision(cfg, precision: str, train: list, sources: list, decoders: dict, args) -> dict:
    """Ceiling, interleaved training, peak memory and interleaved decoding for one precision."""
    print(f"[{precision}] matmul ceiling, {len(train)} interleaved training steps ...", flush=True)
    ceiling = matmul_ceiling(precision, args.device, args.matmul_size)
    seconds = train_interleaved(cfg, precision, train, args.device, args.master_weights)
    print(f"[{precision}] peak memory, one process per implementation ...", flush=True)
    memory = {impl: measure_memory(impl, precision, args) for impl in IMPLS}
    print(f"[{precision}] decoding {sum(len(s) for s in sources)} sentences x {args.rounds} rounds ...", flush=True)
    decoding = decode_interleaved(decoders, sources, precision, args)
    return {"ceiling_gflops": ceiling, "step_seconds": seconds, "peak_mib": memory, "decoding": decoding}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.tune_malloc:
        tune_malloc()
    quiet()
    cfg = PRESETS[args.preset]
    if args.memory_child:
        train, _ = load_batches(args.data, args.batch_size, args.memory_steps, 1, args.device)
        peak = memory_child(args.memory_child, cfg, args.precision[0], train, args.device, args.master_weights)
        print(json.dumps({"peak_mib": peak}))
        return
    train, sources = load_batches(args.data, args.batch_size, args.warmup + args.steps, args.decode_sentences,
                                  args.device)
    decoders = {impl: build_model(impl, cfg, args.device).eval() for impl in IMPLS}
    results = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "config": vars(cfg), "vocab": VOCAB, "dropout": DROPOUT,
        "parameters": {impl: trainable_parameters(model) for impl, model in decoders.items()},
        "attention": {"marian": decoders["marian"].config._attn_implementation},
        "step_tokens": [target_tokens(b) for b in train], "step_flops": training_flops(cfg, train),
        "batch_shapes": [list(b["tgt"].shape) for b in train],
        "precisions": {p: run_precision(cfg, p, train, sources, decoders, args) for p in args.precision},
    }
    print(write_report(results, args.output_dir, sys.argv[1:]))


if __name__ == "__main__":
    main()
