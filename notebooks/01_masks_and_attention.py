# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Masks and attention
#
# A Transformer sees a whole batch at once, so two things must be hidden from each attention:
# **padding** (the filler that makes sentences of different lengths one rectangle) and, in the
# decoder, **the future** (the tokens it is being trained to predict). This notebook draws both
# masks for a real batch, then trains a small model and shows that its attention weights are
# exactly zero wherever the masks say so.
#
# One convention holds throughout `lightning_transformer.nn.masks`: masks are boolean and
# **`True` means "may attend"**. They broadcast against attention scores of shape
# `(batch, heads, queries, keys)` and go to `F.scaled_dot_product_attention` as they are.

# %%
import os
from pathlib import Path

QUICK = os.environ.get("LT_NOTEBOOK_QUICK") == "1"  # the test run's smaller setting
ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()  # run from notebooks/ or the root
RUNS = Path(os.environ.get("LT_RUNS_DIR", ROOT / "runs" / "notebooks"))  # logs and checkpoints, inside the repository

# %%
import logging

import matplotlib.pyplot as plt
import torch
from lightning.pytorch import Trainer, seed_everything
from torch.utils.data import DataLoader

from lightning_transformer import (
    Seq2SeqTransformer,
    create_causal_mask,
    create_combined_mask,
    create_padding_mask,
    greedy_decode,
)
from lightning_transformer.data import TranslationDataModule, collate

seed_everything(0)
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

# %% [markdown]
# ## A real batch
#
# Four validation pairs of the embedded English→Spanish corpus, of different lengths, tokenised
# with the project's joint BPE vocabulary and padded with id 0 to the longest. Sources end in
# `</s>`; targets are wrapped in `<s> … </s>`.

# %%
data = TranslationDataModule(vocab_size=8000)
data.prepare_data()
data.setup("validate")
tokenizer, validation = data.tokenizer, data.splits["validation"]
lengths = validation["length"]
picked = [min(range(len(lengths)), key=lambda i: abs(lengths[i] - wanted)) for wanted in (4, 7, 10, 13)]
batch = collate(validation[picked], tokenizer.pad_id)
src, tgt = batch["src"], batch["tgt"]
tgt_input = tgt[:, :-1]  # the decoder reads the target shifted right


def pieces(ids):
    return [tokenizer.decode([i], skip_special_tokens=False) if i != tokenizer.pad_id else "·" for i in ids.tolist()]


for row in src:
    print(" ".join(pieces(row)))
print("src", tuple(src.shape), "tgt", tuple(tgt.shape))

# %% [markdown]
# ## The padding mask
#
# `create_padding_mask(src)` is `(B, 1, 1, S)`: one row of keys per sentence, the same for every
# head and every query. Encoder self-attention uses it, and so does the decoder's cross-attention,
# whose keys are the source positions. White is "may attend".

# %%
src_mask = create_padding_mask(src, tokenizer.pad_id)
print("src_mask", tuple(src_mask.shape))

fig, ax = plt.subplots(figsize=(9, 2.2))
ax.imshow(src_mask[:, 0, 0], cmap="gray", vmin=0, vmax=1)
for b, row in enumerate(src):
    for s, piece in enumerate(pieces(row)):
        ax.text(s, b, piece, ha="center", va="center", fontsize=7, color="black" if src_mask[b, 0, 0, s] else "white")
ax.set(title="padding mask (B, S): True = may attend", xlabel="source position (key)", ylabel="sentence")
plt.show()

# %% [markdown]
# ## The causal mask, and both together
#
# `create_causal_mask(T)` is lower-triangular: query position *i* may read keys *j ≤ i*, so the
# prediction of token *i + 1* never sees it. Decoder self-attention needs both rules at once:
# `create_combined_mask(tgt_input)` is `(B, 1, T, T)`, the causal triangle with the padding
# columns of each sentence removed. (Rows of padding queries stay partly open; their outputs are
# never scored, because the loss ignores padding targets.)

# %%
causal = create_causal_mask(tgt_input.size(1))
tgt_mask = create_combined_mask(tgt_input, tokenizer.pad_id)
assert torch.equal(tgt_mask, causal & create_padding_mask(tgt_input, tokenizer.pad_id))

fig, axes = plt.subplots(1, 5, figsize=(14, 3))
axes[0].imshow(causal, cmap="gray", vmin=0, vmax=1)
axes[0].set(title=f"causal ({causal.size(0)}×{causal.size(0)})", xlabel="key", ylabel="query")
for b, ax in enumerate(axes[1:]):
    ax.imshow(tgt_mask[b, 0], cmap="gray", vmin=0, vmax=1)
    ax.set(title=f"combined, sentence {b}", xlabel="key")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## A model whose right attention we know
#
# To see what a trained model does with these masks, train one on a task whose correct attention
# is known in advance: **reverse the source**. To write target token *t* the decoder must look at
# source position *S − 1 − t*, so its cross-attention should become an anti-diagonal. Sentences
# of 3–12 random tokens make padding appear in every batch. The model is small and trains in
# seconds; the recipe is the project's own (`training_step`, masks, loss, schedule).

# %%
VOCAB, PAD, BOS, EOS, LONGEST = 24, 0, 1, 2, 12


def reversal_batch(size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.randint(3, LONGEST + 1, (size,), generator=generator).tolist()
    src = torch.full((size, LONGEST + 1), PAD)
    tgt = torch.full((size, LONGEST + 2), PAD)
    for row, length in enumerate(lengths):
        body = torch.randint(3, VOCAB, (length,), generator=generator)
        src[row, : length + 1] = torch.cat([body, torch.tensor([EOS])])
        tgt[row, : length + 2] = torch.cat([torch.tensor([BOS]), body.flip(0), torch.tensor([EOS])])
    return src, tgt


steps = 300 if QUICK else 600
generator = torch.Generator().manual_seed(0)
train_batches = [reversal_batch(64, generator) for _ in range(steps)]
reverser = Seq2SeqTransformer(VOCAB, VOCAB, d_model=64, nhead=2, num_encoder_layers=2, num_decoder_layers=2,
                              dim_feedforward=128, dropout=0.0, share_embeddings=True, label_smoothing=0.0,
                              scheduler="cosine", lr=3e-3, warmup_steps=50)
Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False).fit(reverser, DataLoader(train_batches, batch_size=None))

test_src, test_tgt = reversal_batch(200, torch.Generator().manual_seed(1))
reverser.eval()
outputs = greedy_decode(reverser, test_src, LONGEST + 2, PAD, BOS, EOS)
expected = [row[1 : row.index(EOS)] for row in test_tgt.tolist()]
print(f"greedy decoding reverses {sum(o == e for o, e in zip(outputs, expected))} of {len(expected)} test sentences")

# %% [markdown]
# ## Reading the attention weights
#
# Training never stores attention probabilities (SDPA fuses them away), so we record what each
# attention module receives with a forward hook and ask it for the weights it applied:
# `MultiHeadAttention.attention_weights(x, mask, memory)` returns `(B, H, queries, keys)`.

# %%
def record_attention(model: Seq2SeqTransformer, src: torch.Tensor, tgt: torch.Tensor) -> dict[str, torch.Tensor]:
    """Attention weights ``(B, H, queries, keys)`` of every attention module during one forward pass."""
    calls = {}

    def remember(name):
        def hook(module, args, kwargs, output):  # returns None, so the output is left as it is
            calls[name] = (module, args, kwargs)
        return hook

    hooks = [module.register_forward_hook(remember(name), with_kwargs=True)
             for name, module in model.transformer.named_modules() if name.endswith("attn")]
    with torch.no_grad():
        model(src, tgt[:, :-1])
        for hook in hooks:
            hook.remove()
        return {name: module.attention_weights(*args, memory=kwargs.get("memory"))
                for name, (module, args, kwargs) in calls.items()}


weights = record_attention(reverser, test_src[:8], test_tgt[:8])
print({name: tuple(w.shape) for name, w in weights.items()})

# %% [markdown]
# The masks hold exactly: every weight on a masked key is 0, not merely small.

# %%
enc_mask = create_padding_mask(test_src[:8], PAD)
dec_mask = create_combined_mask(test_tgt[:8, :-1], PAD)
for name, w in weights.items():
    mask = dec_mask if "decoder" in name and "self_attn" in name else enc_mask
    assert (w.masked_select(~mask) == 0).all(), name
print("no weight on any masked key, in", len(weights), "attention modules")

# %% [markdown]
# One sentence, heads averaged, the last layer of each kind, real (non-padding) queries only. The
# encoder attends only within the real tokens (the padding columns are blank); the decoder's
# self-attention is a lower triangle; and its cross-attention is the anti-diagonal the task asks
# for: the query that writes target token *t* reads source token *S − 2 − t* (the source ends in
# `</s>` at *S − 1*).

# %%
src_lengths = (test_src[:8] != PAD).sum(1)
sentence = int(src_lengths.argsort()[4])  # a middling length, so padding shows
src_len = int(src_lengths[sentence])
tgt_len = int((test_tgt[sentence] != PAD).sum()) - 1
panels = [
    ("encoder self-attention", weights["encoder_layers.1.self_attn"], slice(None, src_len),
     "source key", "source query"),
    ("decoder self-attention", weights["decoder_layers.1.self_attn"], slice(None, tgt_len),
     "target key", "target query"),
    ("cross-attention", weights["decoder_layers.1.cross_attn"], slice(None, tgt_len), "source key", "target query"),
]
fig, axes = plt.subplots(1, 3, figsize=(14, 4))
for ax, (title, w, rows, xlabel, ylabel) in zip(axes, panels):
    ax.imshow(w[sentence].mean(0)[rows], cmap="viridis", vmin=0)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
plt.tight_layout()
plt.show()

cross = weights["decoder_layers.1.cross_attn"][sentence].mean(0)[: tgt_len - 1, :src_len]
mirrored = torch.arange(src_len - 2, -1, -1)
print("cross-attention argmax on the mirrored source position for",
      f"{int((cross.argmax(-1) == mirrored).sum())} of {len(mirrored)} target tokens")

# %% [markdown]
# Where next: `03_train_and_translate` trains on the real corpus; `04_research_by_subclassing`
# shows how to change the masks (`make_masks`) or the loss in a subclass without copying a step.
