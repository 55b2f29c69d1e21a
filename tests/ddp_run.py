"""Trains a tiny ``Seq2SeqTransformer`` or ``CausalLMTransformer`` (``--model``) a few steps on 1 or 2
CPU processes; rank 0 saves the result.

Run by ``test_distributed.py`` as a script, because Lightning's DDP launcher starts the second
rank by re-running ``sys.argv``.
"""

from __future__ import annotations

import argparse
import os

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, DistributedSampler

from lightning_transformer import BF16MasterWeights, CausalLMTransformer, Seq2SeqTransformer, precision

# Adam's eps sits well above the float32 noise in the key biases' gradients (zero in exact arithmetic:
# softmax ignores a bias shared by all keys), which a 1e-9 eps would turn into lr-sized steps.
VOCAB = 24
MODEL = dict(src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, d_model=32, nhead=4, num_encoder_layers=2,
             num_decoder_layers=2, dim_feedforward=64, dropout=0.0, scheduler="noam", warmup_steps=4,
             lr_factor=0.5, eps=1e-3)
LM = dict(vocab_size=VOCAB, d_model=32, nhead=4, num_layers=2, dim_feedforward=64, dropout=0.0, max_len=32,
          scheduler="noam", warmup_steps=4, lr_factor=0.5, eps=1e-3)
MODELS = {"seq2seq": (Seq2SeqTransformer, MODEL), "lm": (CausalLMTransformer, LM)}
PER_RANK_BATCH, STEPS = 2, 5
BOS, EOS = torch.tensor([1]), torch.tensor([2])


def uneven_pairs(count: int, model: str = "seq2seq") -> list[dict[str, torch.Tensor]]:
    """``{"src", "tgt"}`` pairs, the target the reversed source, or for ``lm`` ``{"tgt"}`` alone: bodies
    of 10-14 tokens at even indices, 1-2 at odd ones.

    ``DistributedSampler(shuffle=False)`` gives rank ``r`` of 2 indices ``r, r + 2, ...``, so rank 0
    sees only long targets and rank 1 only short ones.
    """
    generator = torch.Generator().manual_seed(0)
    pairs = []
    for index in range(count):
        low, high = (10, 15) if index % 2 == 0 else (1, 3)
        length = int(torch.randint(low, high, (1,), generator=generator))
        body = torch.randint(3, VOCAB, (length,), generator=generator)
        pair = {"src": torch.cat([body.flip(0), EOS]), "tgt": torch.cat([BOS, body, EOS])}
        pairs.append(pair if model == "seq2seq" else {"tgt": pair["tgt"]})
    return pairs


def pad_batch(pairs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: pad_sequence([pair[key] for pair in pairs], batch_first=True, padding_value=0) for key in pairs[0]}


class PerRankMean:
    """Mixed into a model: the normalisation to rule out, each rank's mean loss weighs the same, whatever
    its tokens (what DDP gives a module whose training step returns a plain mean loss)."""

    def backward(self, loss, *args, **kwargs):
        LightningModule.backward(self, loss, *args, **kwargs)

    def on_before_optimizer_step(self, optimizer) -> None:
        pass


class UnevenPairs(LightningDataModule):
    """One global step covers dataset indices ``2bk .. 2b(k+1) - 1`` on any number of processes:
    as one batch of ``2b`` alone, as two per-rank batches of ``b`` under DDP."""

    def __init__(self, model: str = "seq2seq") -> None:
        super().__init__()
        self.model = model

    def train_dataloader(self) -> DataLoader:
        pairs = uneven_pairs(2 * PER_RANK_BATCH * STEPS, self.model)
        # Lightning's own distributed sampler always shuffles training data; this one keeps the order.
        world_size = self.trainer.world_size
        sampler = DistributedSampler(pairs, num_replicas=world_size, rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(pairs, batch_size=2 * PER_RANK_BATCH // world_size, sampler=sampler, collate_fn=pad_batch)


class RecordLosses(Callback):
    """Per optimizer step, on every rank: the token-weighted loss over all ranks, and the mean of
    the ranks' own mean losses (what averaging per-rank losses would report)."""

    def __init__(self) -> None:
        self.global_losses, self.rank_mean_losses = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        tokens = (batch["tgt"][:, 1:] != pl_module.pad_token_id).sum()  # both models predict tgt[:, 1:]
        rank_mean = trainer.callback_metrics["train/loss"].detach().clone()  # this rank's mean over its tokens
        reduce = trainer.strategy.reduce  # all-reduces in place: every argument is a fresh tensor
        total = reduce(rank_mean * tokens, reduce_op="sum") / reduce(tokens, reduce_op="sum")
        self.global_losses.append(total.item())
        self.rank_mean_losses.append(reduce(rank_mean, reduce_op="mean").item())


class CountBarriers(Callback):
    """Barriers entered from a training batch's start to its end (optimizer step included): each one
    makes every rank wait for the slowest."""

    def __init__(self) -> None:
        self.count = 0
        self._barrier = torch.distributed.barrier

    def _counted(self, *args, **kwargs):
        self.count += 1
        return self._barrier(*args, **kwargs)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.distributed.barrier = self._counted

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        torch.distributed.barrier = self._barrier


def leave_process_group() -> None:
    """Tear gloo down before the interpreter exits; left to exit, its threads can abort a finished rank."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, choices=(1, 2), required=True)
    parser.add_argument("--model", choices=tuple(MODELS), default="seq2seq")
    parser.add_argument("--per-rank-mean", action="store_true", help="train PerRankMean instead")
    parser.add_argument("--master-weights", action="store_true", help="in bf16 through BF16MasterWeights")
    parser.add_argument("--bf16-faster-by-rank", help="BF16MasterWeights() as configs use it, each rank's "
                        "measurement of bf16's speed given, e.g. `no,yes`")
    parser.add_argument("--init", required=True, help="state dict both runs start from")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()

    torch.use_deterministic_algorithms(True)
    plugins = [BF16MasterWeights(fall_back_to_float32=False)] if args.master_weights else None
    if args.bf16_faster_by_rank:
        measured = args.bf16_faster_by_rank.split(",")[int(os.environ.get("LOCAL_RANK", 0))] == "yes"
        precision.bf16_pays = lambda: measured
        plugins = [BF16MasterWeights()]
    model_class, config = MODELS[args.model]
    if args.per_rank_mean:
        model_class = type("PerRankMean", (PerRankMean, model_class), {})
    model = model_class(**config)
    model.load_state_dict(torch.load(args.init))
    record, barriers = RecordLosses(), CountBarriers()
    trainer = Trainer(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                      max_steps=STEPS, gradient_clip_val=1.0, use_distributed_sampler=False,
                      callbacks=[barriers, record],
                      plugins=plugins,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, UnevenPairs(args.model))
    if trainer.is_global_zero:
        torch.save({"state_dict": model.state_dict(), "losses": record.global_losses,
                    "rank_mean_losses": record.rank_mean_losses, "world_size": trainer.world_size,
                    "barriers_in_steps": barriers.count}, args.output)
    else:
        torch.save(model.state_dict(), f"{args.output}.rank{trainer.global_rank}")
    leave_process_group()


if __name__ == "__main__":
    main()
