# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Train and translate
#
# The whole recipe from a notebook: the embedded English→Spanish corpus through a BPE tokenizer,
# the model of `configs/demo.yaml`, a Lightning `Trainer` whose flags do the engineering (mixed
# precision, gradient clipping), curves read back from the logger, and translations by greedy and
# beam search. The full setting trains the demo's 400 steps, about four minutes on two CPU cores.

# %%
import os
from pathlib import Path

QUICK = os.environ.get("LT_NOTEBOOK_QUICK") == "1"  # the test run's smaller setting
ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()  # run from notebooks/ or the root
RUNS = Path(os.environ.get("LT_RUNS_DIR", ROOT / "runs" / "notebooks"))  # logs and checkpoints, inside the repository

# %%
import logging

import matplotlib.pyplot as plt
import pandas as pd
import torch
import yaml
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_transformer import (
    BF16MasterWeights,
    Seq2SeqTransformer,
    TrainingDoctor,
    beam_search,
    greedy_decode,
    tune_malloc,
)
from lightning_transformer.callbacks import TokenThroughput, TranslationMetrics
from lightning_transformer.cli.translate import load_translator, translate
from lightning_transformer.data import TranslationDataModule

tune_malloc()  # keeps per-step buffers allocated between steps: ~10% faster on CPU (the CLI does this too)
seed_everything(1)
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

# %% [markdown]
# ## Data
#
# `TranslationDataModule()` reads the corpus that ships inside the package, trains a joint BPE
# vocabulary on its training split (cached after the first run) and serves batches by a budget of
# padded tokens, with sentences of similar length together so little of each batch is padding.

# %%
demo = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
data = TranslationDataModule(**demo["data"]["init_args"])
data.prepare_data()
data.setup("fit")
tokenizer = data.tokenizer
source = "Where is the station?"
print(tokenizer, "|", source, "->", [tokenizer.decode([i]) for i in tokenizer.encode(source)])
print(f"{len(data.splits['train']):,} training pairs, {len(data.splits['validation']):,} validation pairs")

# %% [markdown]
# ## Model and Trainer
#
# The model's hyperparameters are the demo config's, so this run and `lightning-transformer fit
# --config configs/demo.yaml` train the same network. Everything that is engineering rather than model
# is a `Trainer` argument: bf16 weights with float32 master weights in the optimizer
# (`plugins=[BF16MasterWeights()]`, as the config has it; float32 instead on a CPU that only emulates
# bf16; `precision="bf16-mixed"` is the stock alternative, slower on a CPU), `gradient_clip_val=1.0`,
# and, were they needed, `accumulate_grad_batches`, `devices` and `strategy="ddp"`. The callbacks
# score corpus BLEU with beam search (`TranslationMetrics`), keep checkpoints, and watch for the usual
# failures (`TrainingDoctor`).

# %%
hparams = dict(demo["model"]["init_args"], src_vocab_size=tokenizer.vocab_size, tgt_vocab_size=tokenizer.vocab_size)
max_steps, val_every = (40, 20) if QUICK else (demo["trainer"]["max_steps"], demo["trainer"]["val_check_interval"])
if QUICK:  # a much smaller network, so the test run takes seconds
    hparams.update(d_model=64, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=128,
                   warmup_steps=10)
model = Seq2SeqTransformer(**hparams)
scoring = next(c["init_args"] for c in demo["trainer"]["callbacks+"] if c["class_path"].endswith("TranslationMetrics"))
metrics = TranslationMetrics(**dict(scoring, every_n_evaluations=1) if QUICK else scoring)  # BLEU as the config
trainer = Trainer(
    accelerator="cpu", plugins=[BF16MasterWeights()], gradient_clip_val=1.0, max_steps=max_steps,
    val_check_interval=val_every, check_val_every_n_epoch=None, limit_val_batches=3 if QUICK else None,
    use_distributed_sampler=False,  # the data module shards batches per rank itself
    logger=CSVLogger(RUNS, name="train_and_translate"), log_every_n_steps=10,
    callbacks=[metrics, ModelCheckpoint(monitor="val/loss", save_last=True), TrainingDoctor(),
               LearningRateMonitor(logging_interval="step"), TokenThroughput()],
    enable_progress_bar=False, enable_model_summary=False,
)
print(f"{sum(p.numel() for p in model.parameters()):,} parameters; logs in {trainer.logger.log_dir}")

# %%
trainer.fit(model, data)
print({name: f"{float(value):.4g}" for name, value in trainer.callback_metrics.items()})

# %% [markdown]
# ## Curves from the logger
#
# `CSVLogger` wrote every logged value to `metrics.csv`. The training loss is label-smoothed, so
# it stays above the validation NLL (the unsmoothed loss whose exponential is perplexity). The
# learning rate is the one each step ran with: linear warm-up, then cosine decay.

# %%
logged = pd.read_csv(Path(trainer.logger.log_dir) / "metrics.csv")
train_rows, val_rows = logged.dropna(subset=["train/loss"]), logged.dropna(subset=["val/nll"])
lr_rows = logged.dropna(subset=["train/lr"])  # LearningRateMonitor's rows
fig, axes = plt.subplots(1, 3, figsize=(14, 3))
axes[0].plot(train_rows["step"], train_rows["train/loss"], label="train loss (smoothed)")
axes[0].plot(val_rows["step"], val_rows["val/loss"], "o-", label="val loss (smoothed)")
axes[0].plot(val_rows["step"], val_rows["val/nll"], "o-", label="val NLL")
axes[0].set(title="loss", xlabel="step", ylabel="nats per token")
axes[0].legend()
axes[1].plot(val_rows["step"], val_rows["val/ppl"], "o-")
axes[1].set(title="validation perplexity", xlabel="step", yscale="log")
axes[2].plot(lr_rows["step"], lr_rows["train/lr"])
axes[2].set(title="learning rate", xlabel="step")
plt.tight_layout()
plt.show()
print(val_rows[[c for c in ("step", "val/loss", "val/nll", "val/ppl", "val/bleu", "val/chrf") if c in val_rows]]
      .to_string(index=False))

# %% [markdown]
# ## Greedy and beam search
#
# Greedy decoding takes the most likely token at every step. Beam search keeps the 4 best
# prefixes, finishes those that emit `</s>`, and ranks the finished ones by log-probability
# divided by a length penalty (GNMT's `((5 + L) / 6)^α`, α = 0.6 as in the paper), because a
# plain sum of log-probabilities favours short outputs. After 400 CPU steps (validation BLEU
# about 16) the translations are rough, and beam search can repeat a word; longer
# training removes that (`configs/multi30k_en_de.yaml` reaches 39 BLEU in an hour on two cores).

# %%
sentences = ["Where is the station?", "I don't like coffee.", "Tom is reading a book in the garden.",
             "We have to leave before it rains.", "She was born in a small town."]
model.eval()
encoded = [torch.tensor(tokenizer.encode(text) + [tokenizer.eos_id]) for text in sentences]
src = torch.nn.utils.rnn.pad_sequence(encoded, batch_first=True, padding_value=tokenizer.pad_id)
greedy = greedy_decode(model, src, 40, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)
table = pd.DataFrame({"English": sentences, "greedy": tokenizer.decode_batch(greedy),
                      "beam 4": translate(model, tokenizer, sentences, beam_size=4)})
table

# %% [markdown]
# The four finished hypotheses of beam search for one sentence, best first: `score` is what they
# are ranked by, `log_prob` the raw sum.

# %%
nbest = beam_search(model, src[2:3], beam_size=4, nbest=4, pad_token_id=tokenizer.pad_id,
                    bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, alpha=0.6)[0]
pd.DataFrame({"hypothesis": [tokenizer.decode(h.tokens) for h in nbest], "length": [len(h.tokens) for h in nbest],
              "log_prob": [round(h.log_prob, 2) for h in nbest], "score": [round(h.score, 2) for h in nbest]})

# %% [markdown]
# ## A checkpoint alone is enough
#
# Checkpoints carry the tokenizer, so translating later needs nothing else; this is what
# `lightning-transformer translate CHECKPOINT` does. They are read with `weights_only=True`:
# a checkpoint from elsewhere cannot run code when it is loaded.

# %%
checkpoint = trainer.checkpoint_callback.last_model_path
restored, restored_tokenizer = load_translator(checkpoint)
print(Path(checkpoint).name, "->", translate(restored, restored_tokenizer, sentences[:1], beam_size=4))
assert translate(restored, restored_tokenizer, sentences, beam_size=4) == list(table["beam 4"])
