"""Where a training step's time goes: PyTorch profiler over the project's step, top operators.

Runs ``Seq2SeqTransformer``'s own path (shift, masks, forward, loss, backward, Adam step) on
synthetic batches shaped like Multi30k (64 pairs, 10-30 subwords), with the allocator tuned as
the CLI tunes it, then prints the operators with
the most self CPU time and writes them to ``benchmarks/results/profile_<preset>_<precision>.md``.

    python benchmarks/profile_step.py [--preset small|base] [--precision bf16|fp32] [--steps 10]
"""

from __future__ import annotations

import argparse
import datetime
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from lightning_transformer import Seq2SeqTransformer, tune_malloc
from lightning_transformer.nn.cpu_choices import machine_key

RESULTS = Path(__file__).parent / "results"
PRESETS = {
    "small": dict(d_model=256, nhead=4, num_encoder_layers=3, num_decoder_layers=3, dim_feedforward=1024),
    "base": dict(d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=2048),
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


def write_report(prof: profile, title: str, command: str, name: str, top: int, note: str = "") -> None:
    """Prints the ``top`` operators by self CPU time under a header naming the machine; writes ``results/<name>.md``."""
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    report = f"# {title}\n\n{datetime.date.today()} · {machine_key()} · `{command}`\n\n{note}```\n{table}\n```\n"
    print(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.md").write_text(report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="small")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    tune_malloc()  # as the CLI does
    torch.manual_seed(0)
    model = Seq2SeqTransformer(src_vocab_size=args.vocab, tgt_vocab_size=args.vocab, share_embeddings=True,
                               **PRESETS[args.preset]).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9, fused=True)
    generator = torch.Generator().manual_seed(0)
    batches = [synthetic_batch(64, args.vocab, generator) for _ in range(args.steps + 3)]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    for batch in batches[:3]:
        train_step(model, optimizer, batch, autocast)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches[3:]:
            train_step(model, optimizer, batch, autocast)
    command = " ".join(["python benchmarks/profile_step.py", f"--preset {args.preset}",
                        f"--precision {args.precision}", f"--steps {args.steps}"])
    write_report(prof, f"Profile of {args.steps} training steps, {args.preset} preset, {args.precision}", command,
                 f"profile_{args.preset}_{args.precision}", args.top)

if __name__ == "__main__":
    main()
