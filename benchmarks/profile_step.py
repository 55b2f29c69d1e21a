"""Where a training step's time goes: PyTorch profiler over the project's step, top operators.

Runs ``Seq2SeqTransformer``'s own path (shift, masks, forward, loss, backward, Adam step) on
synthetic batches shaped like Multi30k (64 pairs by default, 10-30 subwords), or with ``--data`` on the
throughput benchmark's real Multi30k batches, with the allocator tuned as the CLI tunes it, then
prints the operators with the most self CPU time and writes them to
``<output-dir>/profile_<preset>_<precision>[_bf16_weights].md``. ``--bf16-weights`` profiles what
``BF16MasterWeights`` trains: a bf16 model without autocast, Adam on float32 master copies.

    python benchmarks/profile_step.py [--preset small|base|tiny] [--precision bf16|fp32] [--steps 10]
    python benchmarks/profile_step.py --data ../shared/data/multi30k --steps 30 --bf16-weights
    python benchmarks/profile_step.py --preset tiny --batch-size 280 --data ../shared/data/multi30k --bf16-weights
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml
from torch.profiler import ProfilerActivity, profile

from lightning_transformer import Seq2SeqTransformer, tune_malloc
from lightning_transformer.data.tokenizer import PAD_ID
from lightning_transformer.nn.cpu_choices import machine_key

RESULTS = Path(__file__).parent / "results"
TINY_CONFIG = Path(__file__).parents[1] / "configs" / "multi30k_en_de_tiny.yaml"
PRESETS = {
    "small": dict(d_model=256, nhead=4, num_encoder_layers=3, num_decoder_layers=3, dim_feedforward=1024),
    "base": dict(d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=2048),
    # the tiny recipe's model as its config builds it, regularisation included
    "tiny": yaml.safe_load(TINY_CONFIG.read_text())["model"]["init_args"],
}


def synthetic_batch(batch_size: int, vocab: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded ``(src, tgt)`` ids with BOS/EOS, lengths uniform in [10, 30) like Multi30k subwords."""
    rows = []
    for _ in range(2):
        lengths = torch.randint(10, 30, (batch_size,), generator=generator)
        ids = torch.zeros(batch_size, int(lengths.max()) + 2, dtype=torch.long)
        for i, n in enumerate(lengths.tolist()):
            ids[i, 0], ids[i, n + 1] = 1, 2
            ids[i, 1 : n + 1] = torch.randint(4, vocab, (n,), generator=generator)
        rows.append(ids)
    return rows[0], rows[1]


def train_step(model: Seq2SeqTransformer, optimizer: torch.optim.Optimizer, batch, autocast,
               set_to_none: bool = True) -> None:
    """The project's training step without a Trainer: shift, masks, forward, loss, backward, Adam."""
    src, tgt = batch
    with autocast:
        tgt_input, tgt_output = model.shift_targets(tgt)
        src_mask, tgt_mask = model.make_masks(src, tgt_input)
        states = model.decode_states(tgt_input, model.encode(src, src_mask), tgt_mask, src_mask)
        loss = model.compute_loss(states, tgt_output)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=set_to_none)


class FloatMasters:
    """Adam over float32 copies of a bf16 model's weights, used like an optimizer: ``BF16MasterWeights``'s update."""

    def __init__(self, model: torch.nn.Module, **adam) -> None:
        self.pairs = [(p, p.detach().float()) for p in model.parameters()]
        self.adam = torch.optim.Adam([master for _, master in self.pairs], **adam)

    def step(self) -> None:
        for param, master in self.pairs:
            master.grad = param.grad.float()
        self.adam.step()
        with torch.no_grad():
            for param, master in self.pairs:
                param.copy_(master)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param, master in self.pairs:
            param.grad = master.grad = None


def write_report(prof: profile, title: str, command: str, name: str, top: int, note: str = "",
                 results: Path = RESULTS) -> None:
    """Prints the ``top`` operators by self CPU time under a header naming the machine; writes the table to
    ``<results>/<name>.md``."""
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    report = f"# {title}\n\n{datetime.date.today()} · {machine_key()} · `{command}`\n\n{note}```\n{table}\n```\n"
    print(report)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.md").write_text(report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="small")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=64, help="sentence pairs a batch (the recipes: ~280)")
    parser.add_argument("--data", type=Path, help="Multi30k folder: profile the throughput benchmark's batches")
    parser.add_argument("--bf16-weights", action="store_true", help="bf16 model, float32 masters in Adam")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.bf16_weights and args.precision != "bf16":
        parser.error("--bf16-weights trains in bf16; leave --precision at bf16.")
    tune_malloc()  # as the CLI does
    torch.manual_seed(0)
    model = Seq2SeqTransformer(src_vocab_size=args.vocab, tgt_vocab_size=args.vocab,
                               **{"share_embeddings": True, **PRESETS[args.preset]}).train()
    adam = dict(lr=1e-4, betas=(0.9, 0.98), eps=1e-9, fused=True)
    if args.bf16_weights:
        optimizer = FloatMasters(model.to(torch.bfloat16), **adam)
    else:
        optimizer = torch.optim.Adam(model.parameters(), **adam)
    if args.data:
        from throughput import load_batches  # the benchmark's batches: length-bucketed pairs, seed 0

        loaded, _ = load_batches(args.data, args.batch_size, args.steps + 3, 64, "cpu")
        batches = [(batch["src"], batch["tgt"]) for batch in loaded]
    else:
        generator = torch.Generator().manual_seed(0)
        batches = [synthetic_batch(args.batch_size, args.vocab, generator) for _ in range(args.steps + 3)]
    bf16_autocast = args.precision == "bf16" and not args.bf16_weights
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16_autocast else nullcontext()
    for batch in batches[:3]:
        train_step(model, optimizer, batch, autocast)
    start = time.perf_counter()
    for batch in batches[3:]:
        train_step(model, optimizer, batch, autocast)
    seconds = (time.perf_counter() - start) / args.steps
    tokens = statistics.mean(int((tgt[:, 1:] != PAD_ID).sum()) for _, tgt in batches[3:])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches[3:]:
            train_step(model, optimizer, batch, autocast)
    precision = "bf16, bf16 weights with float32 masters" if args.bf16_weights else args.precision
    flags = [f"--preset {args.preset}", f"--precision {args.precision}", f"--steps {args.steps}",
             f"--batch-size {args.batch_size}"]
    flags += ([f"--data {args.data}"] if args.data else []) + (["--bf16-weights"] if args.bf16_weights else [])
    command = " ".join(["python benchmarks/profile_step.py", *flags])
    batches_said = "the throughput benchmark's Multi30k batches" if args.data else "synthetic Multi30k-shaped batches"
    note = (f"{batches_said}; unprofiled: {seconds * 1000:.0f} ms a step, {tokens / seconds:,.0f} target tokens/s "
            f"(mean {tokens:.0f} a step), over the {args.steps} steps the profile then covers.\n\n")
    name = f"profile_{args.preset}_{args.precision}" + ("_bf16_weights" if args.bf16_weights else "")
    write_report(prof, f"Profile of {args.steps} training steps, {args.preset} preset, {precision}", command,
                 name, args.top, note, args.output_dir)

if __name__ == "__main__":
    main()
