"""Where decoding time goes: PyTorch profiler over ``beam_search`` or ``greedy_decode``, top operators.

Decodes the Multi30k validation batches that ``benchmarks/throughput.py`` decodes (its
``load_batches``) with a randomly initialised small or base model, as it does (bf16 autocast or
float32, a fixed limit of tokens a sentence, which random weights reach), then prints the operators
with the most self CPU time and writes them to ``benchmarks/results/profile_decode_<mode>_<preset>_<precision>.md``.

    python benchmarks/profile_decode.py [--mode beam4|greedy] [--preset small|base] [--precision bf16|fp32]
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from profile_step import PRESETS, write_report
from throughput import ROOT, VOCAB, load_batches
from torch.profiler import ProfilerActivity, profile

from lightning_transformer import Seq2SeqTransformer, beam_search, greedy_decode, tune_malloc
from lightning_transformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID


def run(model, sources: list[torch.Tensor], mode: str, max_len: int) -> None:
    for src in sources:
        if mode == "greedy":
            greedy_decode(model, src, max_len, PAD_ID, BOS_ID, EOS_ID)
        else:
            beam_search(model, src, 4, 0.0, max_len, PAD_ID, BOS_ID, EOS_ID, 0.6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["beam4", "greedy"], default="beam4")
    parser.add_argument("--preset", choices=PRESETS, default="small")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--sentences", type=int, default=128, help="as throughput.py --decode-sentences")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "multi30k")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    tune_malloc()  # as the CLI does
    torch.manual_seed(0)
    model = Seq2SeqTransformer(src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, share_embeddings=True,
                               **PRESETS[args.preset]).eval()
    _, sources = load_batches(args.data, 64, 0, args.sentences, "cpu")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    with torch.inference_mode(), autocast:
        run(model, [sources[0][:2]], args.mode, 2)
        start = time.perf_counter()
        for _ in range(args.repeats):
            run(model, sources, args.mode, args.max_new_tokens)
        seconds = (time.perf_counter() - start) / args.repeats
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.repeats):
                run(model, sources, args.mode, args.max_new_tokens)
    command = " ".join(["python benchmarks/profile_decode.py", f"--mode {args.mode}", f"--preset {args.preset}",
                        f"--precision {args.precision}", f"--sentences {args.sentences}"])
    note = (f"{args.sentences} sentences in batches of up to 64 × {args.max_new_tokens} tokens: {seconds * 1e3:.0f} ms "
            f"unprofiled ({args.sentences * args.max_new_tokens / seconds:,.0f} tokens/s), mean of {args.repeats}; "
            f"the profile covers {args.repeats} more.\n\n")
    write_report(prof, f"Profile of {args.mode} decoding, {args.preset} preset, {args.precision}", command,
                 f"profile_decode_{args.mode}_{args.preset}_{args.precision}", args.top, note)


if __name__ == "__main__":
    main()
