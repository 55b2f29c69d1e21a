"""Checkpoints: read without running any code, and carrying the random state a resumed run needs.

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
import torch.distributed as dist
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_warn

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
        if "GLOBAL" not in str(error) and "Unsupported" not in str(error):  # damaged, not hostile
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


def capture_rng_state() -> dict:
    """The random generators dropout draws from: the CPU one and every CUDA device's."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Undo :func:`capture_rng_state`; CUDA states are restored only when the device count matches."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class ResumeRandomState(Callback):
    """Stores every rank's random state in checkpoints and restores each rank's own at the first resumed batch.

    Lightning saves no random state, so a resumed run would draw other dropout masks than the run it
    continues. Only rank 0 writes the checkpoint, so the states of all ranks are gathered into it
    (``rng_states[rank]``). Restoring at the first batch, not at load time, skips whatever draws
    random numbers while the run sets up. ``Seq2SeqTransformer`` brings this callback along.
    """

    def __init__(self) -> None:
        self._pending: list[dict] | dict | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        state = capture_rng_state()
        if dist.is_available() and dist.is_initialized():
            # Lightning builds the checkpoint on every rank, so every rank joins this collective.
            states: list = [None] * dist.get_world_size()
            dist.all_gather_object(states, state)
        else:
            states = [state]
        checkpoint["rng_states"] = states

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._pending = checkpoint.get("rng_states")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._pending is None:
            return
        states, self._pending = self._pending, None
        if isinstance(states, dict):  # written before states were kept per rank: rank 0's
            restore_rng_state(states)
            return
        if len(states) != trainer.world_size:
            rank_zero_warn(
                f"the checkpoint holds the random states of {len(states)} processes, but this run has "
                f"{trainer.world_size}: ranks below {len(states)} get their own back, the others keep theirs, and "
                "dropout will not replay the original run. Resume on the same number of processes to replay it."
            )
        if trainer.global_rank < len(states):
            restore_rng_state(states[trainer.global_rank])


def _unsafe_global(error: Exception) -> str:
    found = re.search(r"GLOBAL (\S+)", str(error))
    return f"it asks for {found.group(1)}" if found else _first_line(error)


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
