"""``lightning-transformer``: ``fit|validate|test|predict`` through LightningCLI, plus ``translate``, ``generate``
and ``average``."""

from __future__ import annotations

import importlib
import inspect
import sys

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from ..checkpoint import check_checkpoint_path
from ..modules.base import TokenLevelModule
from . import average, generate, translate
from .allocator import tune_malloc

TOOLS = {"translate": translate.main, "generate": generate.main, "average": average.main}


class TransformerCLI(LightningCLI):
    """LightningCLI for any :class:`TokenLevelModule`, its embeddings sized by the data module's ``vocab_size``."""

    #: What the models call their vocabulary sizes (Seq2SeqTransformer the first two, CausalLMTransformer the last).
    vocab_arguments = ("src_vocab_size", "tgt_vocab_size", "vocab_size")

    def before_instantiate_classes(self) -> None:
        # Not jsonargparse's link_arguments: a link's target must exist in every model class, and a
        # link to an argument the chosen class lacks still lands in its saved hyperparameters, so the
        # checkpoint no longer rebuilds. Each model gets the data module's vocabulary under its own names.
        config = self.config[self.config.subcommand] if self.config.get("subcommand") else self.config
        vocab_size = ((config.get("data") or {}).get("init_args") or {}).get("vocab_size")
        if vocab_size is None:
            return
        module_name, _, class_name = config.model.class_path.rpartition(".")
        accepted = inspect.signature(getattr(importlib.import_module(module_name), class_name)).parameters
        for name in self.vocab_arguments:
            if name in accepted:
                config.model.init_args[name] = vocab_size

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
        TokenLevelModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
    )


if __name__ == "__main__":
    main()
