"""``lightning-transformer translate``: sentences in, translations out, from a checkpoint or a CTranslate2 export alone.

Beam search by default (one translation a line); ``--nbest N`` writes the N best of each sentence in
Marian's n-best format; ``--sampling`` draws one translation per sentence (back-translation).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from ..data.tokenizer import Tokenizer
from ..export.ct2 import import_ctranslate2
from ..export.ct2_translator import CT2Translator, encode_sources
from ..generation.decoding import Hypothesis, greedy_decode, max_output_lengths, sampler
from ..generation.scoring import score_ids
from ..modules.seq2seq import Seq2SeqTransformer
from . import io
from .loading import load_model, tokenizer_from_checkpoint  # noqa: F401 (re-exported for callers)

#: The hyperparameters decoding reads; a CTranslate2 export stores the same ones as ``decoding.json``.
SETTINGS = ("beam_size", "length_penalty", "max_decode_len_a", "max_decode_len_b", "max_len", "pad_token_id",
            "bos_token_id", "eos_token_id")


def load_translator(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Seq2SeqTransformer, Tokenizer]:
    """Model (in eval mode) and tokenizer from one checkpoint, the model rebuilt as the class that saved it."""
    return load_model(path, Seq2SeqTransformer, map_location)


class CheckpointTranslator:
    """A checkpoint's model translating, sampling and scoring with :class:`CT2Translator`'s methods.

    Sources are batched by length, then returned in input order. ``None`` arguments take the model's
    settings.

    Args:
        model: the translation model, in eval mode.
        tokenizer: its tokenizer.
        seed: seed of :meth:`sample`'s generator; the same seed, input and batch size draw the same samples.
    """

    def __init__(self, model: Seq2SeqTransformer, tokenizer: Tokenizer, seed: int | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.settings = {name: model.hparams[name] for name in SETTINGS}
        self.generator = torch.Generator(model.device)
        if seed is not None:
            self.generator.manual_seed(seed)

    def encode(self, sentences: Sequence[str]) -> list[list[int]]:
        """Source ids (no EOS), cut to fit the model's ``max_len`` with one warning for all."""
        return encode_sources(self.tokenizer, sentences, self.settings["max_len"])

    def translate(self, sentences: Sequence[str], beam_size: int | None = None, length_penalty: float | None = None,
                  batch_size: int = 64, progress: bool = False) -> list[str]:
        """The best translation of each sentence (the model's own ``translate_ids``)."""
        hypotheses = self._run(self.encode(sentences), batch_size,
                               lambda src, _: self.model.translate_ids(src, beam_size, length_penalty), progress)
        return self.tokenizer.decode_batch([hyps[0].tokens for hyps in hypotheses])

    def translate_nbest(self, sentences: Sequence[str], nbest: int, beam_size: int | None = None,
                        length_penalty: float | None = None,
                        batch_size: int = 64) -> list[list[tuple[str, Hypothesis]]]:
        """Each sentence's ``nbest`` best ``(text, hypothesis)``, best first (the model's own ``translate_ids``)."""

        def search(src: torch.Tensor, _) -> list[list[Hypothesis]]:
            return self.model.translate_ids(src, beam_size, length_penalty, nbest)

        hypotheses = self._run(self.encode(sentences), batch_size, search)
        return [[(self.tokenizer.decode(hyp.tokens), hyp) for hyp in hyps] for hyps in hypotheses]

    def sample(self, sentences: Sequence[str], temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, batch_size: int = 64) -> list[str]:
        """One sampled translation per sentence (back-translation), within beam search's length limits.

        ``top_k`` and ``top_p`` (``None``: off) filter the distribution, pad and BOS excluded;
        ``temperature = 0`` is greedy.
        """
        s, choose = self.settings, sampler(temperature, top_k, top_p, self.generator)

        def decode(src: torch.Tensor, _) -> list[list[int]]:
            limits = max_output_lengths(src, s["pad_token_id"], s["max_decode_len_a"], s["max_decode_len_b"],
                                        s["max_len"])
            return greedy_decode(self.model, src, limits, s["pad_token_id"], s["bos_token_id"], s["eos_token_id"],
                                 choose=choose)

        return self.tokenizer.decode_batch(self._run(self.encode(sentences), batch_size, decode))

    def score_ids(self, sources: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
                  batch_size: int = 64) -> list[list[float]]:
        """Per-token log-probabilities of ``targets`` (ids without BOS/EOS; EOS's comes last) given ``sources``."""
        s = self.settings
        if any(len(ids) >= s["max_len"] for ids in (*sources, *targets)):
            raise ValueError(f"a source or target has {s['max_len']} or more tokens, beyond the model's "
                             f"max_len={s['max_len']} with EOS; cut it shorter.")
        targets = [[s["bos_token_id"], *ids, s["eos_token_id"]] for ids in targets]

        def score(src: torch.Tensor, rows: list[int]) -> list[list[float]]:
            tgt = self._pad([targets[i] for i in rows])
            return score_ids(self.model, src, tgt, s["pad_token_id"])

        return self._run(sources, batch_size, score, key=lambda i: (len(sources[i]), len(targets[i])))

    def _run(self, sources: Sequence[Sequence[int]], batch_size: int, decode: Callable, progress: bool = False,
             key: Callable[[int], object] | None = None) -> list:
        """``decode(src (B, S), rows)`` over batches of ``sources`` by length (or ``key``); results in input order.

        Sources are ids without EOS; ``src`` ends each with it; ``rows`` are their indices in ``sources``.
        """
        order = sorted(range(len(sources)), key=key or (lambda i: len(sources[i])))
        results: list = [None] * len(sources)
        with tqdm(total=len(sources), disable=not progress, unit="sent", file=sys.stderr) as bar:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                src = self._pad([[*sources[i], self.settings["eos_token_id"]] for i in rows])
                for i, result in zip(rows, decode(src, rows)):
                    results[i] = result
                bar.update(len(rows))
        return results

    def _pad(self, rows: list[list[int]]) -> torch.Tensor:
        return pad_sequence([torch.tensor(ids) for ids in rows], batch_first=True,
                            padding_value=self.settings["pad_token_id"]).to(self.model.device)


def translate(model: Seq2SeqTransformer, tokenizer: Tokenizer, sentences: Sequence[str], beam_size: int | None = None,
              batch_size: int = 64, progress: bool = False, length_penalty: float | None = None) -> list[str]:
    """Translate ``sentences`` with beam search, batched by length; returns them in input order.

    A sentence longer than the model's ``max_len`` (EOS included) is cut to it, with one warning for all.
    """
    return CheckpointTranslator(model, tokenizer).translate(sentences, beam_size, length_penalty, batch_size, progress)


def open_translator(path: str, device: str = "cpu", seed: int | None = None) -> CT2Translator | CheckpointTranslator:
    """A CTranslate2 export (a folder) or a checkpoint (a file), behind the same methods."""
    if Path(path).is_dir():
        io.check_cuda(device, import_ctranslate2().get_cuda_device_count())
        try:
            return CT2Translator(path, device, seed=seed)
        except (RuntimeError, ValueError, KeyError) as error:  # a damaged file in the folder
            first_line = (str(error).strip().splitlines() or [""])[0]
            raise ValueError(f"{path} could not be loaded as a CTranslate2 export ({type(error).__name__}: "
                             f"{first_line}); export the checkpoint again with `lightning-transformer export CKPT "
                             "--format ct2 --output DIR`.") from None
    io.check_cuda(device, torch.cuda.device_count())
    return CheckpointTranslator(*load_translator(path, device), seed=seed)


def nbest_lines(nbest: list[list[tuple[str, Hypothesis]]]) -> list[str]:
    """Marian's n-best format: ``sentence index ||| translation ||| F0= log-probability ||| score``, best first.

    The index counts input lines from 0; the score is the log-probability over the GNMT length penalty.
    """
    return [f"{i} ||| {text} ||| F0= {hyp.log_prob:.4f} ||| {hyp.score:.4f}"
            for i, hyps in enumerate(nbest) for text, hyp in hyps]


def _check_options(args) -> None:
    """Refuse flags that do not go together, before anything is loaded."""
    sampling_flags = [flag for flag, value in (("--temperature", args.temperature), ("--top-k", args.top_k),
                                               ("--top-p", args.top_p), ("--seed", args.seed)) if value is not None]
    if sampling_flags and not args.sampling:
        raise ValueError(f"{sampling_flags[0]} applies to --sampling only; add --sampling or drop it.")
    beam_flags = [flag for flag, value in (("--nbest", args.nbest), ("--beam-size", args.beam_size),
                                           ("--length-penalty", args.length_penalty)) if value is not None]
    if args.sampling and beam_flags:
        raise ValueError(f"--sampling draws one translation without beams, so {beam_flags[0]} does not apply; "
                         "drop one of them.")
    if args.nbest is not None and args.beam_size is not None and args.nbest > args.beam_size:
        raise ValueError(f"--nbest {args.nbest} exceeds --beam-size {args.beam_size}; ask for at most "
                         f"{args.beam_size} or raise --beam-size to {args.nbest}.")


def _outputs(engine: CT2Translator | CheckpointTranslator, sentences: list[str], args) -> list[str]:
    if args.sampling:
        temperature = 1.0 if args.temperature is None else args.temperature
        return engine.sample(sentences, temperature, args.top_k, args.top_p, args.batch_size)
    if args.nbest is not None:
        beam = args.beam_size or engine.settings["beam_size"]
        if args.nbest > beam:
            raise ValueError(f"--nbest {args.nbest} exceeds the model's beam size {beam}; ask for at most {beam} "
                             f"or pass --beam-size {args.nbest}.")
        return nbest_lines(engine.translate_nbest(sentences, args.nbest, args.beam_size, args.length_penalty,
                                                  args.batch_size))
    return engine.translate(sentences, args.beam_size, args.length_penalty, args.batch_size, progress=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = io.ArgumentParser(prog="lightning-transformer translate", description=__doc__)
    parser.add_argument("checkpoint", help="a .ckpt file written by `lightning-transformer fit`, or a folder written "
                                           "by `lightning-transformer export --format ct2`")
    parser.add_argument("--input", "-i", default="-", help="one sentence a line; '-' reads stdin")
    parser.add_argument("--output", "-o", default="-", help="where translations go (a new file); '-' writes stdout")
    parser.add_argument("--beam-size", type=io.positive_int, default=None, help="default: the model's beam_size")
    parser.add_argument("--length-penalty", type=float, default=None, help="GNMT alpha; default: the model's")
    parser.add_argument("--nbest", type=io.positive_int, default=None,
                        help="write the N best of each sentence (N <= beam size) as `i ||| translation ||| "
                             "F0= log-prob ||| score`, i counting input lines from 0")
    parser.add_argument("--sampling", action="store_true", help="draw one translation per sentence, e.g. for "
                                                                "back-translation")
    parser.add_argument("--temperature", type=io.temperature, default=None, help="--sampling: 0 is greedy; default 1")
    parser.add_argument("--top-k", type=io.top_k, default=None, help="--sampling: among the k likeliest tokens only")
    parser.add_argument("--top-p", type=io.top_p, default=None, help="--sampling: within the nucleus of mass p only")
    parser.add_argument("--seed", type=int, default=None,
                        help="--sampling: seed, for output reproducible at the same --batch-size; default 0")
    parser.add_argument("--batch-size", type=io.positive_int, default=64, help="sentences decoded together")
    parser.add_argument("--device", type=io.device, default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    with io.one_line_errors():
        _check_options(args)
        io.check_input(args.input)
        output = io.check_output(args.output)
        engine = open_translator(args.checkpoint, args.device, args.seed or 0)
        sentences = io.read_lines(args.input)
        with io.plain_warnings():
            lines = _outputs(engine, sentences, args)
        io.write_lines(output, lines)
