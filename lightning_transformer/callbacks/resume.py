"""``ResumeRandomState``: dropout's random state travels in checkpoints, one per rank, so resuming is exact."""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_warn


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
    random numbers while the run sets up. ``TokenLevelModule`` (so every module of this package) brings this
    callback along.
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
