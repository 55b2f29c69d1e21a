"""``lightning-transformer fit|validate|test|predict``: LightningCLI over the model and data module."""

from __future__ import annotations

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from .model import Seq2SeqTransformer


class TransformerCLI(LightningCLI):
    """LightningCLI that sizes the model's embeddings from the data module's vocabulary."""

    def add_arguments_to_parser(self, parser) -> None:
        for target in ("model.init_args.src_vocab_size", "model.init_args.tgt_vocab_size"):
            parser.link_arguments("data.vocab_size", target, apply_on="instantiate")


def main(args=None) -> None:
    """Entry point of the ``lightning-transformer`` console script."""
    TransformerCLI(
        Seq2SeqTransformer,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
