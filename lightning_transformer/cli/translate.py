"""``lightning-transformer translate``: sentences in, translations out, from a checkpoint or a CTranslate2 export alone."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from ..callbacks.writers import write_atomically
from ..data.tokenizer import Tokenizer
from ..export.ct2_translator import CT2Translator, encode_sources
from ..modules.seq2seq import Seq2SeqTransformer
from .loading import load_model, tokenizer_from_checkpoint  # noqa: F401 (re-exported for callers)


def load_translator(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Seq2SeqTransformer, Tokenizer]:
    """Model (in eval mode) and tokenizer from one checkpoint, the model rebuilt as the class that saved it."""
    return load_model(path, Seq2SeqTransformer, map_location)


def translate(model: Seq2SeqTransformer, tokenizer: Tokenizer, sentences: Sequence[str], beam_size: int | None = None,
              batch_size: int = 64, progress: bool = False, length_penalty: float | None = None) -> list[str]:
    """Translate ``sentences`` with beam search, batched by length; returns them in input order.

    A sentence longer than the model's ``max_len`` (EOS included) is cut to it, with one warning for all.
    """
    encoded = [ids + [tokenizer.eos_id] for ids in encode_sources(tokenizer, sentences, model.hparams.max_len)]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(encoded)
    with tqdm(total=len(encoded), disable=not progress, unit="sent", file=sys.stderr) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            src = pad_sequence([torch.tensor(encoded[i]) for i in chunk], batch_first=True,
                               padding_value=tokenizer.pad_id).to(model.device)
            for i, hyps in zip(chunk, model.translate_ids(src, beam_size, length_penalty)):
                outputs[i] = tokenizer.decode(hyps[0].tokens)
            bar.update(len(chunk))
    return outputs


def _read_lines(source: Iterable[str]) -> list[str]:
    return [line.rstrip("\n") for line in source]


def _translator(path: str, device: str) -> Callable[[list[str], int | None, float | None, int], list[str]]:
    """``translate(sentences, beam_size, length_penalty, batch_size)`` through a CTranslate2 export or a checkpoint."""
    if Path(path).is_dir():
        engine = CT2Translator(path, device)
        return lambda sentences, beam, alpha, batch: engine.translate(sentences, beam, alpha, batch, progress=True)
    model, tokenizer = load_translator(path, device)
    return lambda sentences, beam, alpha, batch: translate(model, tokenizer, sentences, beam, batch, progress=True,
                                                           length_penalty=alpha)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lightning-transformer translate", description=__doc__)
    parser.add_argument("checkpoint", help="a .ckpt file written by `lightning-transformer fit`, or a folder written "
                                           "by `lightning-transformer export --format ct2`")
    parser.add_argument("--input", "-i", default="-", help="one sentence a line; '-' reads stdin")
    parser.add_argument("--output", "-o", default="-", help="where translations go; '-' writes stdout")
    parser.add_argument("--beam-size", type=int, default=None, help="default: the model's beam_size")
    parser.add_argument("--length-penalty", type=float, default=None, help="GNMT alpha; default: the model's")
    parser.add_argument("--batch-size", type=int, default=64, help="sentences decoded together")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.input != "-" and not Path(args.input).is_file():
        raise SystemExit(f"error: input file {args.input} does not exist; pass a text file, one sentence a line, or '-'.")
    output_path = None if args.output == "-" else Path(args.output)
    if output_path is not None and output_path.exists():
        raise SystemExit(f"error: {output_path} exists; choose another --output, translations never overwrite a file.")
    try:
        translator = _translator(args.checkpoint, args.device)
    except (FileNotFoundError, ValueError, ImportError) as error:
        raise SystemExit(f"error: {error}") from None
    if args.input == "-":
        sentences = _read_lines(sys.stdin)
    else:
        with open(args.input, encoding="utf-8") as handle:
            sentences = _read_lines(handle)
    with warnings.catch_warnings():
        # One plain line (e.g. over-long input), not the source excerpt Python shows by default.
        warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}", file=sys.stderr)
        translations = translator(sentences, args.beam_size, args.length_penalty, args.batch_size)
    text = "".join(line + "\n" for line in translations)
    if output_path is None:
        sys.stdout.write(text)
    else:
        write_atomically(output_path, text)
