"""Checkpoints: read without running any code (the random state they carry is :mod:`.callbacks.resume`'s).

Lightning writes checkpoints (atomically: a temporary file renamed into place). This module reads
them with ``torch.load(weights_only=True)``: tensors, containers and plain values only, so a file
from elsewhere cannot run code when opened. Everything the project stores fits that; there is no
allow-list of extra types to trust.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

# Values of ``ckpt_path`` that Lightning resolves itself instead of reading a file.
LIGHTNING_CKPT_ALIASES = ("last", "best", "hpc", "registry")


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds pickled objects beyond tensors and plain values, which could run code."""


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """Read a checkpoint without unpickling code, with a clear error for a missing, unsafe or unreadable file.

    ``mmap=True`` reads tensors lazily: a cheap check, or metadata only.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass the path of a .ckpt file written by fit.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        # torch names a refused class "Unsupported global: GLOBAL …"; an unknown opcode ("Unsupported
        # operand") means a damaged or foreign file, not a hostile one.
        if "GLOBAL" not in str(error):
            raise _unreadable(path, error) from None
        raise UnsafeCheckpointError(
            f"checkpoint {path} holds pickled objects other than tensors and plain values, and opening it could run "
            f"code, so it was not loaded ({_unsafe_global(error)}). Use a checkpoint written by `lightning-transformer "
            "fit`; if you wrote this file yourself and trust it, re-save its tensors with torch.save."
        ) from None
    except Exception as error:
        raise _unreadable(path, error) from None


def _unreadable(path: Path, error: Exception) -> ValueError:
    return ValueError(
        f"checkpoint {path} could not be read ({type(error).__name__}: {_first_line(error)}); it may be truncated "
        "or not a Lightning checkpoint. Use another checkpoint, e.g. last.ckpt."
    )


def check_checkpoint_path(ckpt_path: str | Path | None) -> None:
    """Fail early, with :func:`load_checkpoint`'s message, on a ``ckpt_path`` that cannot be resumed from."""
    if ckpt_path is None or str(ckpt_path) in LIGHTNING_CKPT_ALIASES:
        return
    checkpoint = load_checkpoint(ckpt_path, mmap=True)
    missing = [key for key in ("state_dict", "global_step") if key not in checkpoint]
    if missing:
        raise ValueError(
            f"checkpoint {ckpt_path} lacks {missing}, so it is not a Lightning training checkpoint; "
            "pass a .ckpt file written by `lightning-transformer fit`."
        )


def stored_tokenizer(checkpoint: dict) -> str | None:
    """The tokenizer JSON that the data module stored in ``checkpoint``, if any."""
    for value in checkpoint.values():
        if isinstance(value, dict) and isinstance(value.get("tokenizer"), str):
            return value["tokenizer"]
    return None


def _unsafe_global(error: Exception) -> str:
    found = re.search(r"GLOBAL (\S+)", str(error))
    return f"it asks for {found.group(1)}" if found else _first_line(error)


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
