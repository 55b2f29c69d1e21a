"""Two gloo processes, seeded differently, train a tiny model with dropout; ``--phase save`` checkpoints
after step 2, ``--phase resume`` continues from that checkpoint. Each rank writes the random state
it had when the checkpoint was saved, or at its first resumed batch, to ``rank<r>-<phase>.pt``.

Run by ``test_checkpoint.py`` as a script, because Lightning's DDP launcher starts the second rank by
re-running ``sys.argv``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from ddp_run import MODEL, UnevenPairs, leave_process_group
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_transformer import Seq2SeqTransformer

SAVE_AT = 2


class SeedPerRank(Callback):
    """Rank ``r`` draws from seed ``r``: each rank's dropout masks differ, as in a real run."""

    def setup(self, trainer, pl_module, stage) -> None:
        torch.manual_seed(trainer.global_rank)


class RecordRandomState(Seq2SeqTransformer):
    """Writes this rank's random state at each checkpoint save and at its first training batch
    (module hooks run after every callback's, so after the restore)."""

    def __init__(self, output: str, phase: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.output, self.phase, self._recorded = Path(output), phase, False

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.phase == "save":
            torch.save(torch.get_rng_state(), self.output / f"rank{self.global_rank}-save.pt")

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self.phase == "resume" and not self._recorded:
            torch.save(torch.get_rng_state(), self.output / f"rank{self.global_rank}-resume.pt")
            self._recorded = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--phase", choices=("save", "resume"), required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()

    model = RecordRandomState(args.output, args.phase, **{**MODEL, "dropout": 0.1})
    checkpoints = ModelCheckpoint(dirpath=args.output, every_n_train_steps=SAVE_AT, save_top_k=-1)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=SAVE_AT + 1,
                      use_distributed_sampler=False, callbacks=[SeedPerRank(), checkpoints], logger=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    ckpt_path = Path(args.output) / f"epoch=0-step={SAVE_AT}.ckpt" if args.phase == "resume" else None
    trainer.fit(model, UnevenPairs(), ckpt_path=ckpt_path)
    leave_process_group()


if __name__ == "__main__":
    main()
