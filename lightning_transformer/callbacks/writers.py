"""``TranslationWriter``: ``predict`` output as text, one line per example in split order, written atomically."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter

from .metrics import gather_unique


class TranslationWriter(BasePredictionWriter):
    """Write ``predict`` output as detokenised text, one line per example in split order.

    Any model whose ``predict_step`` returns ``{"tokens": ids per row, "index": split positions or
    None}`` fits: a translator's translations, a language model's continuations of its prompts. The
    datamodule's ``tokenizer`` decodes them.

    Args:
        output: file to write; it must not exist yet (nothing is overwritten).
    """

    def __init__(self, output: str) -> None:
        super().__init__(write_interval="epoch")
        self.output = Path(output)
        if self.output.exists():
            raise FileExistsError(f"{self.output} exists; choose another output file, predictions never overwrite one.")

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        tokenizer = trainer.datamodule.tokenizer
        lines = {}
        for batch in predictions:
            for position, tokens in enumerate(batch["tokens"]):
                index = batch["index"][position] if batch["index"] is not None else len(lines)
                lines[index] = tokenizer.decode(tokens)
        lines = gather_unique(lines)
        if trainer.is_global_zero:
            write_atomically(self.output, "".join(lines[i] + "\n" for i in sorted(lines)))


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
