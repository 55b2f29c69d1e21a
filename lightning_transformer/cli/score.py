"""``lightning-transformer score``: force-decode given translations; log-probabilities per sentence and per token out.

Like fairseq's ``--score-reference``, ``marian-scorer`` and ``sockeye-score``: each target line is
teacher-forced on its source line, from a checkpoint or a CTranslate2 export. One output line per
pair, in input order: the sentence's total log-probability (natural log), a tab, then the
log-probability of each target token and last of the closing EOS, space-separated. ``--normalize``
makes the first column the mean per token (EOS counted).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..export.ct2_translator import CT2Translator
from . import io
from .translate import CheckpointTranslator, open_translator


def check_pairs(sources: Sequence[str], targets: Sequence[str]) -> None:
    """Refuse source and target lists of different lengths."""
    if len(sources) != len(targets):
        raise ValueError(f"--source has {len(sources)} lines but --target {len(targets)}; pass one translation per "
                         "source line.")


def score(engine: CT2Translator | CheckpointTranslator, sources: Sequence[str], targets: Sequence[str],
          batch_size: int = 64) -> list[list[float]]:
    """Log-probability of each target token and of the closing EOS, teacher-forced on its source.

    Refuses a line the model cannot take whole (it would score a cut sentence), naming the line.
    """
    check_pairs(sources, targets)
    max_len = engine.settings["max_len"]
    encoded = {side: engine.tokenizer.encode_batch(list(lines)) for side, lines in
               (("source", sources), ("target", targets))}
    for side, rows in encoded.items():
        too_long = next((i for i, ids in enumerate(rows) if len(ids) >= max_len), None)
        if too_long is not None:
            raise ValueError(f"{side} line {too_long + 1} has {len(rows[too_long])} tokens, but the model takes at "
                             f"most {max_len - 1} and EOS (max_len={max_len}); shorten or drop that pair.")
    return engine.score_ids(encoded["source"], encoded["target"], batch_size)


def score_line(log_probs: Sequence[float], normalize: bool = False) -> str:
    """``total<TAB>per-token log-probabilities``, the total a mean per token when ``normalize``."""
    total = sum(log_probs) / (len(log_probs) if normalize else 1)
    return f"{total:.4f}\t" + " ".join(f"{value:.4f}" for value in log_probs)


def main(argv: Sequence[str] | None = None) -> None:
    parser = io.ArgumentParser(prog="lightning-transformer score", description=__doc__)
    parser.add_argument("model", help="a .ckpt file written by `lightning-transformer fit`, or a folder written by "
                                      "`lightning-transformer export --format ct2`")
    parser.add_argument("--source", "-s", required=True, help="source sentences, one a line")
    parser.add_argument("--target", "-t", required=True, help="their translations, one a line, line for line")
    parser.add_argument("--output", "-o", default="-", help="where scores go (a new file); '-' writes stdout")
    parser.add_argument("--normalize", action="store_true",
                        help="first column: mean log-probability per token (EOS counted) instead of the sum")
    parser.add_argument("--batch-size", type=io.positive_int, default=64, help="pairs scored together")
    parser.add_argument("--device", type=io.device, default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    with io.one_line_errors():
        if "-" in (args.source, args.target):
            raise ValueError("score reads --source and --target from files, not stdin; write them to files first.")
        sources, targets = io.read_lines(args.source), io.read_lines(args.target)
        output = io.check_output(args.output)
        check_pairs(sources, targets)  # before the model is loaded
        engine = open_translator(args.model, args.device)
        log_probs = score(engine, sources, targets, args.batch_size)
        io.write_lines(output, [score_line(row, args.normalize) for row in log_probs])
