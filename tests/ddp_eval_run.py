"""Fit (with sanity validation), ``validate`` with BLEU, and ``predict`` on N CPU processes whose
evaluation split has fewer batches than ranks; rank 0 saves what every stage counted.

Run by ``test_distributed.py`` as a script, because Lightning's DDP launcher starts the other ranks
by re-running ``sys.argv``.
"""

from __future__ import annotations

import argparse
import json

import torch
from ddp_run import leave_process_group
from lightning.pytorch import Trainer, seed_everything

from lightning_transformer import Seq2SeqTransformer
from lightning_transformer.callbacks import TranslationWriter
from lightning_transformer.callbacks.metrics import TranslationMetrics
from lightning_transformer.data import TokenBudgetBatchSampler, TranslationDataModule, collate

VOCAB, MAX_TOKENS = 556, 150
MODEL = dict(src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, d_model=32, nhead=4, num_encoder_layers=1,
             num_decoder_layers=1, dim_feedforward=64, dropout=0.0, share_embeddings=True, scheduler="cosine",
             lr=3e-3, warmup_steps=2, beam_size=2, max_decode_len_a=1.0, max_decode_len_b=5)


def whole_split_loss(model: Seq2SeqTransformer, data: TranslationDataModule) -> float:
    """The validation loss over every sentence once, in one batch and one process."""
    split = data.splits["validation"]
    batch = collate(split[list(range(len(split)))], pad_id=model.pad_token_id)
    tgt_input, tgt_output = model.shift_targets(batch["tgt"])
    src_mask, tgt_mask = model.make_masks(batch["src"], tgt_input)
    with torch.no_grad():
        states = model.decode_states(tgt_input, model.encode(batch["src"], src_mask), tgt_mask, src_mask)
        return model.compute_loss(states, tgt_output).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--data", required=True, help="a TSV corpus folder")
    parser.add_argument("--cache", required=True)
    parser.add_argument("--output", required=True, help="JSON of what rank 0 saw")
    parser.add_argument("--predictions", required=True, help="where TranslationWriter writes")
    args = parser.parse_args()

    seed_everything(0)
    data = TranslationDataModule(args.data, format="tsv", vocab_size=VOCAB, max_tokens=MAX_TOKENS, max_length=64,
                                 cache_dir=args.cache)
    model = Seq2SeqTransformer(**MODEL)
    metrics = TranslationMetrics(beam_size=2, log_signature=False)
    trainer = Trainer(accelerator="cpu", devices=args.devices, strategy="ddp", max_steps=2, val_check_interval=2,
                      num_sanity_val_steps=2,
                      use_distributed_sampler=False, callbacks=[metrics, TranslationWriter(args.predictions)],
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    fit_bleu_sentences = metrics.last_scores.get("sentences")
    validated = trainer.validate(model, data, verbose=False)[0]
    trainer.predict(model, data, return_predictions=False)
    if trainer.is_global_zero:
        split = data.splits["validation"]
        result = {"world_size": trainer.world_size, "fit_bleu_sentences": fit_bleu_sentences,
                  "validate_bleu_sentences": metrics.last_scores["sentences"], "val_loss": validated["val/loss"],
                  "whole_split_loss": whole_split_loss(model, data), "split_size": len(split),
                  "split_batches": len(TokenBudgetBatchSampler(split["length"], max_tokens=MAX_TOKENS, shuffle=False))}
        with open(args.output, "w") as handle:
            json.dump(result, handle)
    leave_process_group()


if __name__ == "__main__":
    main()
