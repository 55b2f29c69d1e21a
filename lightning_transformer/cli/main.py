"""``lightning-transformer``: ``fit|validate|test|predict`` through LightningCLI, plus ``translate`` and ``average``."""

from __future__ import annotations

import sys

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from ..checkpoint import check_checkpoint_path
from ..modules.seq2seq import Seq2SeqTransformer
from . import average, translate
from .allocator import tune_malloc

TOOLS = {"translate": translate.main, "average": average.main}


class TransformerCLI(LightningCLI):
    """LightningCLI that sizes the model's embeddings from the data module's vocabulary."""

    def add_arguments_to_parser(self, parser) -> None:
        for target in ("model.init_args.src_vocab_size", "model.init_args.tgt_vocab_size"):
            parser.link_arguments("data.vocab_size", target, apply_on="instantiate")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI reads --ckpt_path right after parsing; a bad file fails here with a clear message.
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("weights_only") is not False:
            try:
                check_checkpoint_path(self.config[subcommand].get("ckpt_path"))
            except (FileNotFoundError, ValueError) as error:
                parser.error(str(error))


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-transformer`` console script."""
    argv = sys.argv[1:] if args is None else args
    tune_malloc()
    if argv and argv[0] in TOOLS:
        TOOLS[argv[0]](argv[1:])
        return
    TransformerCLI(
        Seq2SeqTransformer,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
    )


if __name__ == "__main__":
    main()
