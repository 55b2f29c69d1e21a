"""A model and its tokenizer from one checkpoint, rebuilt as the class that trained it (translate, generate)."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import TypeVar

import torch

from ..checkpoint import load_checkpoint, stored_tokenizer
from ..data.tokenizer import Tokenizer
from ..modules.base import TokenLevelModule

Model = TypeVar("Model", bound=TokenLevelModule)


def tokenizer_from_checkpoint(checkpoint: dict, path: str | Path = "the checkpoint") -> Tokenizer:
    """The tokenizer the data module stored in the checkpoint (as JSON)."""
    json_text = stored_tokenizer(checkpoint)
    if json_text is None:
        raise ValueError(
            f"{path} holds no tokenizer; it was not trained with one of this package's data modules. Use a "
            "checkpoint from `lightning-transformer fit`."
        )
    return Tokenizer.from_str(json_text)


def model_class(checkpoint: dict, base: type[Model], path: str | Path = "the checkpoint") -> type[Model]:
    """The class that saved ``checkpoint``: as recorded at save time, else as the CLI named it, else ``base``.

    Raises ``ValueError`` when that class cannot be imported or is no subclass of ``base``.
    """
    name = checkpoint.get("model_class") or checkpoint.get("hyper_parameters", {}).get("_class_path")
    if name is None:
        return base
    module_name, _, class_name = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(
            f"{path} was saved by model class {name}, which cannot be imported ({error}); install the package that "
            "defines it, or put its folder on PYTHONPATH."
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"{path} names model class {name}, which is not a {base.__name__} subclass; this command "
                         f"only loads {base.__name__} models saved by `lightning-transformer fit`.")
    return cls


def load_model(path: str | Path, base: type[Model],
               map_location: str | torch.device = "cpu") -> tuple[Model, Tokenizer]:
    """Model (in eval mode) and tokenizer from one checkpoint, rebuilt as the ``base`` subclass that saved it."""
    if Path(path).is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a checkpoint; pass a .ckpt file written by "
                                "`lightning-transformer fit`.")
    checkpoint = load_checkpoint(path, map_location)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} holds no model weights (no state_dict), so it is no checkpoint of "
                         "`lightning-transformer fit`; pass the .ckpt file that fit wrote.")
    cls = model_class(checkpoint, base, path)
    # Keys with a leading underscore are the CLI's bookkeeping (_class_path, _instantiator), not arguments.
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
    parameters = inspect.signature(cls.__init__).parameters
    unknown = sorted(hparams.keys() - parameters.keys())
    if unknown and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        raise ValueError(
            f"{path} holds hyperparameters {unknown} that {cls.__qualname__} does not take, so it was saved by another "
            "class or version; load it with the code that trained it."
        )
    try:
        model = cls(**hparams)
        model.load_state_dict(checkpoint["state_dict"])
    except (TypeError, ValueError, RuntimeError) as error:
        # load_state_dict lists every missing or misshapen weight over many lines; its first finding is enough.
        finding = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
        raise ValueError(f"{path} does not rebuild as {cls.__qualname__} ({finding[:300]}); the checkpoint is "
                         "inconsistent, use the one `lightning-transformer fit` wrote.") from None
    tokenizer = tokenizer_from_checkpoint(checkpoint, path)
    vocab_size = model.output_projection().out_features
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"the tokenizer in {path} has {tokenizer.vocab_size} tokens but the model only "
            f"{vocab_size}; the checkpoint is inconsistent, retrain or use another checkpoint."
        )
    return model.eval().to(map_location), tokenizer
