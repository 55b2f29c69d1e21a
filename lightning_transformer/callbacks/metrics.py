"""Corpus-level sacreBLEU and chrF of beam-search translations, computed during validation and test."""

from __future__ import annotations

from collections.abc import Mapping

import sacrebleu
import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from ..data.batch import is_filler


def gather_unique(outputs: dict[int, str]) -> dict[int, str]:
    """Every rank's ``{index: hypothesis}`` merged, one entry per index (a no-op without DDP)."""
    if not (dist.is_available() and dist.is_initialized()):
        return outputs
    gathered: list[dict[int, str]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, outputs)
    return {index: text for part in gathered for index, text in part.items()}


class TranslationMetrics(Callback):
    """Translate the evaluation split with beam search and log corpus sacreBLEU and chrF.

    Hypotheses are detokenised with the data module's tokenizer and scored against the split's
    raw reference text over the whole split (not averaged per batch); with an NFKC tokenizer the
    references are NFKC-normalised too, and the printed signature ends in ``|refs:nfkc``. Under
    DDP every rank's ``(index, hypothesis)`` pairs are gathered and de-duplicated by index, so each
    sentence counts exactly once. The data module must provide ``tokenizer`` and ``references(split)``, and its
    evaluation batches an ``index`` tensor of positions in the split.

    Args:
        beam_size: beam width (the paper: 4); 1 decodes greedily.
        length_penalty: GNMT length-penalty alpha; ``None`` uses the model's. Set it here rather than
            on the model to change it for a checkpoint: Lightning's CLI restores model
            hyperparameters from ``--ckpt_path`` over the command line.
        every_n_evaluations: during ``fit``, decode on the n-th, 2n-th, ... validation run
            (decoding costs far more than the loss); standalone validate and test runs always decode.
        log_signature: print sacreBLEU's signature after each scored run.
    """

    def __init__(self, beam_size: int = 4, length_penalty: float | None = None, every_n_evaluations: int = 1,
                 log_signature: bool = True) -> None:
        if beam_size < 1 or every_n_evaluations < 1:
            raise ValueError("beam_size and every_n_evaluations must be >= 1.")
        self.beam_size, self.length_penalty = beam_size, length_penalty
        self.every_n_evaluations, self.log_signature = every_n_evaluations, log_signature
        self._outputs: dict[int, str] = {}
        self._evaluations = 0
        self.last_scores: dict[str, float] = {}
        self.last_hypotheses: list[str] = []
        self.last_references: list[str] = []

    def _active(self, trainer: Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.state.fn != TrainerFn.FITTING:  # a standalone validate or test run always decodes
            return True
        return (self._evaluations + 1) % self.every_n_evaluations == 0

    def _collect(self, trainer: Trainer, pl_module: LightningModule, batch) -> None:
        if not self._active(trainer) or is_filler(batch):
            return
        if not isinstance(batch, Mapping) or "index" not in batch:
            raise KeyError("TranslationMetrics needs evaluation batches that are mappings with an 'index' tensor "
                           "(TranslationDataModule's).")
        tokenizer = trainer.datamodule.tokenizer
        src = pl_module.unpack_batch(batch, need_target=False)[0]  # the model's hook reads its batch format
        hypotheses = pl_module.translate_ids(src, self.beam_size, self.length_penalty)
        for index, hyps in zip(batch["index"].tolist(), hypotheses):
            self._outputs[index] = tokenizer.decode(hyps[0].tokens)

    def _score(self, trainer: Trainer, pl_module: LightningModule, split: str, stage: str) -> None:
        active = self._active(trainer)
        if not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            self._evaluations += 1
        if not active:
            return
        outputs, self._outputs = gather_unique(self._outputs), {}
        references = trainer.datamodule.references(split)
        # A normalising tokenizer can only give back normalised text, so references are compared in that form.
        normalize = trainer.datamodule.tokenizer.normalize
        order = sorted(outputs)
        hypotheses = [outputs[i] for i in order]
        refs = [[normalize(references[i]) for i in order]]
        bleu = sacrebleu.BLEU()
        chrf = sacrebleu.CHRF()
        bleu_score, chrf_score = bleu.corpus_score(hypotheses, refs), chrf.corpus_score(hypotheses, refs)
        self.last_scores = {"bleu": bleu_score.score, "chrf": chrf_score.score, "sentences": len(order)}
        self.last_hypotheses, self.last_references = hypotheses, refs[0]
        device = pl_module.device
        pl_module.log_dict(
            {f"{stage}/bleu": torch.tensor(bleu_score.score, device=device),
             f"{stage}/chrf": torch.tensor(chrf_score.score, device=device)},
            prog_bar=True,
        )
        if self.log_signature:
            # Scores against normalised references are not comparable with raw-reference ones: say so.
            normalization = trainer.datamodule.tokenizer.normalization
            signature = f"{bleu.get_signature()}" + (f"|refs:{normalization}" if normalization != "none" else "")
            rank_zero_info(f"{stage}: {bleu_score.format()} ({len(order)} sentences) | {signature}")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(trainer, pl_module, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(trainer, pl_module, batch)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._score(trainer, pl_module, "validation", "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._score(trainer, pl_module, "test", "test")
