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
# # A decoder-only language model
#
# The same recipe without an encoder: `CausalLMTransformer` reads a line of text and predicts each
# next token from the ones before it. The data is the English side of the embedded corpus
# (`LanguageModelDataModule`'s default), the model and `Trainer` settings are those of
# `configs/lm_demo.yaml`, the validation perplexity is read back from `CSVLogger`, and the trained
# model continues a few prompts at several temperatures. The full setting trains the config's
# 600 steps, about four minutes on two CPU cores.

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
from torch.nn.utils.rnn import pad_sequence

from lightning_transformer import (
    BF16MasterWeights,
    CausalLMTransformer,
    LanguageModelDataModule,
    TrainingDoctor,
    tune_malloc,
)
from lightning_transformer.callbacks import TokenThroughput

tune_malloc()  # keeps per-step buffers allocated between steps: ~10% faster on CPU (the CLI does this too)
seed_everything(1)
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

# %% [markdown]
# ## Data
#
# `LanguageModelDataModule()` with its defaults reads one language of the corpus that ships inside
# the package, here English, and trains a BPE vocabulary on its training split (cached after the
# first run). Every line becomes `<s> ... </s>`; batches are sized by a budget of padded tokens,
# with lines of similar length together. A batch is `{"tgt": (B, T) ids}`: there is no source side.

# %%
lm_demo = yaml.safe_load((ROOT / "configs/lm_demo.yaml").read_text())
data = LanguageModelDataModule(**lm_demo["data"]["init_args"])
data.prepare_data()
data.setup("fit")
tokenizer = data.tokenizer
line = "Tom is reading a book in the garden."
print(tokenizer, "|", line, "->", [tokenizer.decode([i]) for i in tokenizer.encode(line)])
print(f"{len(data.splits['train']):,} training lines, {len(data.splits['validation']):,} validation lines")

# %% [markdown]
# ## The causal mask
#
# A language model is trained by teacher forcing on the line itself: `tgt[:, :-1]` goes in and
# `tgt[:, 1:]` is predicted, so position *t* must be scored without seeing tokens *t + 1* onwards.
# The causal mask forbids that: query *t* may attend to keys 0 … *t* only, a lower triangle. It is
# combined with the padding mask, so no position attends to the padding after a short line.
# `model.make_mask` builds both, as bool `(B, 1, T, T)` with `True` = may attend; below it is drawn
# for the first lines of a real validation batch (white may attend, black may not). The same mask
# is all that separates this model's layers from an encoder's: without it, predicting the next
# token would be copying it.

# %%
hparams = dict(lm_demo["model"]["init_args"], vocab_size=tokenizer.vocab_size)
schedule = lm_demo["trainer"]
max_steps, val_every = (40, 20) if QUICK else (schedule["max_steps"], schedule["val_check_interval"])
if QUICK:  # a much smaller network, so the test run takes seconds
    hparams.update(d_model=64, nhead=2, num_layers=1, dim_feedforward=128, warmup_steps=10)
model = CausalLMTransformer(**hparams)

batch = next(iter(data.val_dataloader()))  # the shortest validation lines, bucketed by length
inputs, targets = model.shift_targets(batch["tgt"])
mask = model.make_mask(inputs)
special = {tokenizer.pad_id: "<pad>", tokenizer.bos_id: "<s>", tokenizer.eos_id: "</s>"}
rows = sorted({0, len(inputs) // 2, len(inputs) - 1})  # a short, a middle and a long line of the batch
fig, axes = plt.subplots(1, len(rows), figsize=(4 * len(rows), 4), squeeze=False)
for b, ax in zip(rows, axes[0]):
    ax.imshow(mask[b, 0], cmap="gray", vmin=0, vmax=1)
    words = [special.get(i) or tokenizer.decode([i]) for i in inputs[b].tolist()]
    ax.set(title=f"row {b}: {int((inputs[b] != tokenizer.pad_id).sum())} tokens + padding", xlabel="key",
           ylabel="query", xticks=range(len(words)), yticks=range(len(words)))
    ax.set_xticklabels(words, rotation=90)
    ax.set_yticklabels(words)
plt.tight_layout()
plt.show()
for b in rows:
    print(f"row {b}:", tokenizer.decode(batch["tgt"][b].tolist()))

# %% [markdown]
# ## Model and Trainer
#
# Two decoder layers of width 256 (post-norm, as in the paper) with tied input and output embeddings,
# the config's cosine schedule with a 100-step warm-up, and the same `Trainer` flags as the
# translation demo: bf16 weights with float32 master weights (`plugins=[BF16MasterWeights()]`, float32
# on a CPU that only emulates bf16), `gradient_clip_val=1.0`, checkpoints, and `TrainingDoctor`
# watching for NaN losses and missing gradients. `max_time` is the config's too, so a slower machine
# stops early instead of running on.

# %%
trainer = Trainer(
    accelerator="cpu", plugins=[BF16MasterWeights()], gradient_clip_val=1.0, max_steps=max_steps,
    max_time=lm_demo["trainer"]["max_time"], val_check_interval=val_every, check_val_every_n_epoch=None,
    limit_val_batches=3 if QUICK else None,
    use_distributed_sampler=False,  # the data module shards batches per rank itself
    logger=CSVLogger(RUNS, name="language_model"), log_every_n_steps=10,
    callbacks=[ModelCheckpoint(monitor="val/loss", save_last=True), TrainingDoctor(),
               LearningRateMonitor(logging_interval="step"), TokenThroughput()],
    enable_progress_bar=False, enable_model_summary=False,
)
print(f"{sum(p.numel() for p in model.parameters()):,} parameters; logs in {trainer.logger.log_dir}")

# %%
trainer.fit(model, data)
print({name: f"{float(value):.4g}" for name, value in trainer.callback_metrics.items()})

# %% [markdown]
# ## Perplexity from the logger
#
# Validation perplexity is `exp` of the unsmoothed NLL per predicted token (`</s>` included,
# padding not): the number of equally likely next tokens the model is, on average, choosing
# among. An untrained model scores about the vocabulary size, 8,000; it falls fast while the model
# learns word frequencies, then slowly as it learns which words follow which. The training loss
# is label-smoothed, so it stays above the validation NLL.

# %%
logged = pd.read_csv(Path(trainer.logger.log_dir) / "metrics.csv")
train_rows, val_rows = logged.dropna(subset=["train/loss"]), logged.dropna(subset=["val/nll"])
fig, axes = plt.subplots(1, 2, figsize=(11, 3))
axes[0].plot(train_rows["step"], train_rows["train/loss"], label="train loss (smoothed)")
axes[0].plot(val_rows["step"], val_rows["val/nll"], "o-", label="val NLL")
axes[0].set(title="loss", xlabel="step", ylabel="nats per token")
axes[0].legend()
axes[1].plot(val_rows["step"], val_rows["val/ppl"], "o-")
axes[1].set(title="validation perplexity", xlabel="step", yscale="log")
plt.tight_layout()
plt.show()
print(val_rows[["step", "val/loss", "val/nll", "val/ppl"]].to_string(index=False))

# %% [markdown]
# ## Sampling at several temperatures
#
# `model.generate` continues prompts that start with `<s>`, as every training line did, until
# `</s>` or `max_new_tokens`. At each step the logits are divided by the temperature before the
# softmax: temperature 0 is greedy (always the likeliest token, the same text every time), 0.7
# sharpens the distribution (the config's default), 1.0 samples from the model as trained, and
# `top_p=0.9` samples only within the smallest set of tokens holding 90% of the probability,
# cutting the unlikely tail that makes pure sampling wander. A fixed `torch.Generator` makes the
# samples reproducible.

# %%
prompts = ["I", "Tom is", "Where is the", "She wants to"]
settings = {"greedy (T = 0)": dict(temperature=0.0), "T = 0.7": dict(temperature=0.7),
            "T = 1.0": dict(temperature=1.0), "T = 1.0, top-p 0.9": dict(temperature=1.0, top_p=0.9)}
model.eval()
encoded = [[tokenizer.bos_id, *tokenizer.encode(prompt)] for prompt in prompts]
ids = pad_sequence([torch.tensor(row) for row in encoded], batch_first=True, padding_value=tokenizer.pad_id)
samples = {}
for name, sampling in settings.items():
    generated = model.generate(ids, max_new_tokens=30, generator=torch.Generator().manual_seed(0), **sampling)
    # generate packs each prompt to the front, so its continuation starts at the prompt's length.
    samples[name] = tokenizer.decode_batch([row[len(prompt):].tolist() for prompt, row in zip(encoded, generated)])
pd.set_option("display.max_colwidth", None)
pd.DataFrame({"prompt": prompts, **samples})
