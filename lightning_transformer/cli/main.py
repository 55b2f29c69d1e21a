"""``lightning-transformer``: ``fit|validate|test|predict`` through LightningCLI, plus ``translate``, ``score``,
``generate``, ``average`` and ``export``."""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.precision import Precision

from ..checkpoint import check_checkpoint_path
from ..modules.base import TokenLevelModule
from . import average, export, generate, score, translate
from .allocator import tune_malloc

TOOLS = {"translate": translate.main, "score": score.main, "generate": generate.main, "average": average.main,
         "export": export.main}

#: The config every run starts from, before its own --config files (``--print_config`` shows it).
DEFAULTS = Path(__file__).with_name("defaults.yaml")


class TransformerCLI(LightningCLI):
    """LightningCLI for any :class:`TokenLevelModule`.

    Every run starts from ``defaults.yaml`` beside this file, logs to a ``CSVLogger`` under
    ``trainer.default_root_dir`` unless a config names a logger, and sizes the model's embeddings
    by the data module's ``vocab_size``.
    """

    def __init__(self, *args, run: bool = True, parser_kwargs: dict | None = None, **kwargs) -> None:
        files = {"default_config_files": [str(DEFAULTS)]}
        defaults = {stage: files for stage in self.subcommands()} if run else files
        super().__init__(*args, run=run, parser_kwargs={**defaults, **(parser_kwargs or {})}, **kwargs)

    #: What the models call their vocabulary sizes (Seq2SeqTransformer the first two, CausalLMTransformer the last).
    vocab_arguments = ("src_vocab_size", "tgt_vocab_size", "vocab_size")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.config.subcommand] if self.config.get("subcommand") else self.config
        self._log_under_root_dir(config.trainer)
        self._link_vocab_size(config)

    @staticmethod
    def _log_under_root_dir(trainer) -> None:
        # Lightning's own default logger is TensorBoard where it is installed, CSV elsewhere; a fixed
        # CSVLogger writes metrics.csv everywhere. Under default_root_dir, like the default logger, so
        # --trainer.default_root_dir moves logs, checkpoints and the tokenizer together.
        if trainer.logger in (None, True):
            save_dir = trainer.default_root_dir or "."
            trainer.logger = Namespace(class_path="lightning.pytorch.loggers.CSVLogger",
                                       init_args=Namespace(save_dir=save_dir))

    def _link_vocab_size(self, config) -> None:
        # Not jsonargparse's link_arguments: a link's target must exist in every model class, and a
        # link to an argument the chosen class lacks still lands in its saved hyperparameters, so the
        # checkpoint no longer rebuilds. Each model gets the data module's vocabulary under its own names.
        vocab_size = ((config.get("data") or {}).get("init_args") or {}).get("vocab_size")
        if vocab_size is None:
            return
        accepted = inspect.signature(_import(config.model.class_path)).parameters
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
        config = self.config[subcommand] if subcommand else self.config
        conflict = precision_conflict(config.get("trainer") or {})
        if conflict:
            parser.error(conflict)


def precision_conflict(trainer) -> str | None:
    """The refusal of a trainer config that sets its precision twice, by ``precision`` and by a plugin.

    The configs that train with :class:`~lightning_transformer.BF16MasterWeights` set it in ``plugins``,
    so ``--trainer.precision bf16-mixed`` on them would otherwise fail deep in the Trainer.
    """
    if trainer.get("precision") is None:
        return None
    for plugin in trainer.get("plugins") or []:
        class_path = plugin.get("class_path") if isinstance(plugin, (dict, Namespace)) else plugin
        plugin_class = _import(class_path) if isinstance(class_path, str) and "." in class_path else None
        if isinstance(plugin_class, type) and issubclass(plugin_class, Precision):
            name = plugin_class.__name__
            return (f"trainer.precision {trainer.get('precision')} and the precision plugin {name} in trainer.plugins "
                    f"both set the precision; to train in {trainer.get('precision')} add --trainer.plugins null, or "
                    "to keep the plugin drop --trainer.precision")
    return None


def _import(class_path: str):
    module_name, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


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
