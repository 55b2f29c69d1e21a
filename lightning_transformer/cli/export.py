"""``lightning-transformer export``: a trained checkpoint out to an inference engine's model folder.

``--format ct2`` writes a CTranslate2 model (``lightning-transformer translate DIR`` decodes it as the
checkpoint would); ``--format hf`` a Hugging Face Marian model.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from ..export.ct2 import QUANTIZATIONS, export_ct2, import_ctranslate2
from . import io
from .translate import load_translator

FORMATS = ("ct2", "hf")


def main(argv: Sequence[str] | None = None) -> None:
    parser = io.ArgumentParser(prog="lightning-transformer export", description=__doc__)
    parser.add_argument("checkpoint", help="a .ckpt file written by `lightning-transformer fit`")
    parser.add_argument("--format", required=True, help="ct2 (CTranslate2) or hf (Hugging Face Marian)")
    parser.add_argument("--output", "-o", required=True, help="a new (or empty) folder for the model")
    parser.add_argument("--quantization", default=None,
                        help="ct2 only: weight type, e.g. int8, int8_float32, bfloat16, float16 (default: float32)")
    args = parser.parse_args(argv)
    with io.one_line_errors():
        path = _export(args.checkpoint, args.format, Path(args.output), args.quantization)
    print(f"exported {args.checkpoint} to {path}", file=sys.stderr)


def _export(checkpoint: str, engine: str, output: Path, quantization: str | None) -> Path:
    """Check every argument before the checkpoint is read, then export; errors name the fix."""
    if engine not in FORMATS:
        raise ValueError(f"unknown --format {engine!r}; choose ct2 (CTranslate2) or hf (Hugging Face).")
    if quantization is not None and engine != "ct2":
        raise ValueError("--quantization applies to --format ct2 only; drop it for hf.")
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown --quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}.")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"{output} exists and is not an empty folder; choose a new --output, an export never "
                              "overwrites.")
    if not output.parent.is_dir():
        raise FileNotFoundError(f"the folder of --output {output} does not exist; create it or export elsewhere.")
    if engine == "ct2":
        import_ctranslate2()  # fails before the checkpoint is read when the extra is missing
    model, tokenizer = load_translator(checkpoint)
    if engine == "ct2":
        return export_ct2(model, tokenizer, output, quantization)
    from ..export.hf import export_hf  # optional extra: imported only when asked for

    return export_hf(model, tokenizer, output)


if __name__ == "__main__":
    main()
