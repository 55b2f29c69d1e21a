# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Loss and schedules
#
# Two pieces of the recipe decide *what* the model is pushed towards and *how fast*: the
# label-smoothed cross-entropy and the learning-rate schedule. This notebook draws the smoothed
# target, shows where it moves the loss's optimum, trains two small models that differ only in
# smoothing to compare their calibration, and plots the paper's Noam schedule for the base and big
# configs beside cosine with warm-up.

# %%
import os
from pathlib import Path

QUICK = os.environ.get("LT_NOTEBOOK_QUICK") == "1"  # the test run's smaller setting
RUNS = Path(os.environ.get("LT_RUNS_DIR", "../runs/notebooks"))  # logs and checkpoints

# %%
import logging
import math

import matplotlib.pyplot as plt
import torch
import yaml
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger

from lightning_transformer import (
    LabelSmoothingLoss, Seq2SeqTransformer, cosine_lambda, noam_lambda, noam_schedule, tune_malloc,
)
from lightning_transformer.data import TranslationDataModule

tune_malloc()  # keeps per-step buffers allocated between steps: faster training on CPU
seed_everything(0)
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

# %% [markdown]
# ## 1. The label-smoothed target
#
# Plain cross-entropy asks for probability 1 on the reference token, which the model can only
# approach by growing its logits without end. Label smoothing takes ε of that mass and spreads it
# over the other tokens: the target gets `1 − ε`, every other token `ε / (V − 2)`, and the padding
# token 0 — it is never a real prediction, so it gets no mass (the guide's convention). A
# vocabulary of 12 makes the bars visible.

# %%
VOCAB, PAD, TARGET = 12, 0, 5


def smoothed_target(vocab_size: int, target: int, smoothing: float, pad: int = PAD) -> torch.Tensor:
    """The smoothed distribution q, built explicitly in float64 (the library never builds it)."""
    q = torch.full((vocab_size,), smoothing / (vocab_size - 2), dtype=torch.float64)
    q[pad] = 0.0
    q[target] = 1.0 - smoothing
    return q


fig, axes = plt.subplots(1, 3, figsize=(10, 3), sharey=True)
for ax, smoothing in zip(axes, (0.0, 0.1, 0.3)):
    q = smoothed_target(VOCAB, TARGET, smoothing)
    assert abs(q.sum().item() - 1.0) < 1e-12
    ax.bar(range(VOCAB), q, color=["tab:gray" if v == PAD else "tab:orange" if v == TARGET else "tab:blue"
                                   for v in range(VOCAB)])
    ax.set(title="one-hot (ε = 0)" if smoothing == 0 else f"smoothed, ε = {smoothing}", xlabel="token id",
           xticks=range(VOCAB))
    print(f"ε = {smoothing}: target {q[TARGET]:.3f}, others {q[1]:.4f}, pad {q[PAD]:.0f}")
axes[0].set_ylabel("target probability")
plt.tight_layout()
plt.show()

# %% [markdown]
# `LabelSmoothingLoss` computes `−Σ q log p` in closed form, without building `q` (for a real
# vocabulary that would be a `tokens × 37 000` tensor). On random logits it must equal the
# cross-entropy against the explicit `q` above; rows whose target is padding count for nothing.

# %%
logits = torch.randn(64, VOCAB) * 3
targets = torch.randint(1, VOCAB, (64,))
targets[::8] = PAD
for smoothing in (0.0, 0.1, 0.3):
    q = torch.stack([smoothed_target(VOCAB, t, smoothing) for t in targets.tolist()])
    per_token = -(q * logits.double().log_softmax(-1)).sum(-1)
    expected = per_token[targets != PAD].mean()
    library = LabelSmoothingLoss(VOCAB, smoothing, pad_token_id=PAD)(logits, targets)
    assert torch.allclose(library.double(), expected, rtol=1e-6), (smoothing, library, expected)
    print(f"ε = {smoothing}: LabelSmoothingLoss {library:.6f}, explicit q {expected:.6f}")

# %% [markdown]
# ## 2. Smoothing moves the optimum away from certainty
#
# Take a prediction that puts probability *p* on the correct token and spreads `1 − p` evenly over
# the other non-pad tokens, and score it with `LabelSmoothingLoss`. Without smoothing the loss keeps
# falling all the way to *p* = 1. With ε > 0 it has a minimum at *p* = `1 − ε`, exactly where the
# prediction equals `q`: being more certain than that is *penalised*, so the model never needs
# ever-larger logits. The minimum is not 0 but the entropy of `q`, which is why a smoothed training
# loss stays above the unsmoothed NLL.

# %%
def prediction_logits(p: torch.Tensor, vocab_size: int = VOCAB) -> torch.Tensor:
    """Logits ``(len(p), V)`` whose softmax is p on TARGET, (1 - p) / (V - 2) on the rest, ~0 on PAD."""
    probs = ((1 - p) / (vocab_size - 2))[:, None].repeat(1, vocab_size)
    probs[:, TARGET] = p
    probs[:, PAD] = 0.0
    return probs.clamp(min=1e-20).log()  # a finite logit for probability 0, so the loss stays defined


p = torch.linspace(0.5, 1.0, 501, dtype=torch.float64)
targets = torch.full((len(p),), TARGET)
fig, ax = plt.subplots(figsize=(8, 3))
for smoothing in (0.0, 0.1, 0.2):
    criterion = LabelSmoothingLoss(VOCAB, smoothing, pad_token_id=PAD, reduction="none")
    loss = criterion(prediction_logits(p).float(), targets)
    best = int(loss.argmin())
    q = smoothed_target(VOCAB, TARGET, smoothing)
    entropy = -(q[q > 0] * q[q > 0].log()).sum()
    assert abs(p[best].item() - (1 - smoothing)) < 1e-9, p[best]
    assert abs(loss[best].item() - entropy.item()) < 1e-5
    print(f"ε = {smoothing}: minimum at p = {p[best]:.3f}, loss there {loss[best]:.4f} = entropy of q {entropy:.4f}")
    line, = ax.plot(p, loss, label=f"ε = {smoothing}")
    ax.plot(p[best], loss[best], "o", color=line.get_color())
ax.set(title="label-smoothed loss of a prediction with p on the target", xlabel="p (probability on the target)",
       ylabel="loss (nats)", ylim=(0, 1.5))
ax.legend()
plt.show()

# %% [markdown]
# ## 3. Calibration: does the model's confidence mean anything?
#
# A model is *calibrated* when, among the tokens it predicts with confidence 0.8, 80% are right.
# Cross-entropy alone rewards ever more confident predictions, and trained networks tend to end up
# overconfident; smoothing caps the confidence it asks for at `1 − ε`. We train two small models
# on the embedded English→Spanish corpus that differ only in `label_smoothing` (0 and 0.1): same
# seed, so the same initial weights, batches and dropout masks.

# %%
if QUICK:  # a few dozen steps of a tiny model: enough to run every line, not to learn much
    size = dict(d_model=64, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=128)
    max_steps, warmup_steps, val_batches = 30, 10, 3
else:
    size = dict(d_model=128, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=512)
    max_steps, warmup_steps, val_batches = 600, 60, None

data = TranslationDataModule(vocab_size=8000, max_tokens=3000, max_length=64, dataset="default")
models = {}
for smoothing in (0.0, 0.1):
    seed_everything(0)
    model = Seq2SeqTransformer(
        src_vocab_size=8000, tgt_vocab_size=8000, **size, share_embeddings=True,
        scheduler="cosine", lr=1e-3, warmup_steps=warmup_steps, label_smoothing=smoothing,
    )
    trainer = Trainer(
        accelerator="cpu", precision="bf16-mixed", max_steps=max_steps, gradient_clip_val=1.0,
        limit_val_batches=0,  # we evaluate below, on every validation token
        use_distributed_sampler=False,  # the data module shards batches itself
        logger=CSVLogger(RUNS, name=f"loss_and_schedules_eps{smoothing}"), log_every_n_steps=10,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, data)
    models[smoothing] = model
    print(f"ε = {smoothing}: {max_steps} steps, last training loss {float(trainer.callback_metrics['train/loss']):.3f}")

# %% [markdown]
# For every non-pad target token of the validation split we record the model's **confidence**
# (its largest softmax probability) and whether that argmax is **correct**. A reliability diagram
# bins tokens by confidence and plots each bin's accuracy: a calibrated model sits on the diagonal,
# bars below it mean overconfidence, bars above it underconfidence. The expected calibration error
# (ECE) is the token-weighted mean gap between the bars and the diagonal.

# %%
@torch.no_grad()
def confidence_and_correctness(model: Seq2SeqTransformer, batches) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    confidence, correct = [], []
    for batch in batches:
        tgt_input, tgt_output = model.shift_targets(batch["tgt"])
        probs = model(batch["src"], tgt_input).float().softmax(-1)
        real = tgt_output != model.pad_token_id
        top_prob, top_id = probs[real].max(-1)
        confidence.append(top_prob)
        correct.append((top_id == tgt_output[real]).float())
    return torch.cat(confidence), torch.cat(correct)


def reliability(confidence: torch.Tensor, correct: torch.Tensor, bins: int = 10):
    """Per-bin token counts, accuracy and mean confidence, and the expected calibration error."""
    which = torch.bucketize(confidence, torch.linspace(0, 1, bins + 1)[1:-1])
    counts = torch.bincount(which, minlength=bins)
    accuracy = torch.bincount(which, weights=correct, minlength=bins) / counts.clamp(min=1)
    mean_confidence = torch.bincount(which, weights=confidence, minlength=bins) / counts.clamp(min=1)
    ece = (counts / counts.sum() * (accuracy - mean_confidence).abs()).sum()
    return counts, accuracy, mean_confidence, float(ece)


validation = list(data.val_dataloader())[:val_batches]
centres = (torch.arange(10) + 0.5) / 10
fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
for ax, (smoothing, model) in zip(axes, models.items()):
    confidence, correct = confidence_and_correctness(model, validation)
    counts, accuracy, mean_confidence, ece = reliability(confidence, correct)
    print(f"ε = {smoothing}: {len(correct):,} tokens, accuracy {correct.mean():.3f}, "
          f"mean confidence {confidence.mean():.3f}, ECE {ece:.3f}")
    used = counts > 0
    ax.bar(centres[used], accuracy[used], width=0.1, edgecolor="black", label="accuracy")
    ax.plot(mean_confidence[used], accuracy[used], "o", color="black", markersize=3, label="(mean confidence, accuracy)")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="calibrated")
    ax.set(title=f"ε = {smoothing}: ECE {ece:.3f}", xlabel="confidence (max probability)", ylabel="accuracy",
           xlim=(0, 1), ylim=(0, 1))
    axes[2].hist(confidence, bins=50, range=(0, 1), histtype="step", label=f"ε = {smoothing}")
axes[0].legend(fontsize=7, loc="upper left")
axes[2].set(title="confidence of validation tokens", xlabel="confidence", ylabel="tokens")
axes[2].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4. Learning-rate schedules
#
# The paper's schedule (section 5.3) warms up linearly, because Adam's early moment estimates are
# poor and large early steps destabilise a post-norm Transformer, then decays as `1/√k`:
# `lr(k) = factor · d_model^−0.5 · min(k^−0.5, k · warmup^−1.5)`. Its peak, at `k = warmup`, is
# `factor · (d_model · warmup)^−0.5`, so the wider big model trains with a smaller learning rate.
# Cosine with warm-up, the usual modern alternative, is drawn with the same peak and warm-up as
# base, so only the shape of the decay differs: it reaches 0 at the end of the run, where Noam is
# still at a fifth of its peak (base).

# %%
def schedule_settings(config_path: str) -> dict:
    config = yaml.safe_load(Path(config_path).read_text())
    model = config["model"]["init_args"]
    return dict(d_model=model["d_model"], warmup_steps=model["warmup_steps"], factor=model.get("lr_factor", 1.0),
                max_steps=config["trainer"]["max_steps"])


configs = {name: schedule_settings(f"../configs/{name}.yaml") for name in ("base", "big")}
fig, ax = plt.subplots(figsize=(10, 3))
for name, c in configs.items():
    steps = range(c["max_steps"])  # LambdaLR's 0-based counter: the k-th optimizer step is step k - 1
    lrs = torch.tensor([noam_lambda(s, c["d_model"], c["warmup_steps"], c["factor"]) for s in steps],
                       dtype=torch.float64)
    c["peak"] = c["factor"] * (c["d_model"] * c["warmup_steps"]) ** -0.5
    assert int(lrs.argmax()) + 1 == c["warmup_steps"] and math.isclose(lrs.max(), c["peak"], rel_tol=1e-12)
    print(f"{name}: d_model {c['d_model']}, warm-up {c['warmup_steps']}, factor {c['factor']}: Noam peak "
          f"{c['peak']:.3e} at step {c['warmup_steps']}; {lrs[-1] / c['peak']:.2f} of it at step {c['max_steps']:,}")
    ax.plot(range(1, c["max_steps"] + 1), lrs, label=f"Noam, {name} (d_model {c['d_model']})")

base = configs["base"]
cosine = [base["peak"] * cosine_lambda(s, base["warmup_steps"], base["max_steps"]) for s in range(base["max_steps"])]
ax.plot(range(1, base["max_steps"] + 1), cosine, "--", label="cosine, base's peak and warm-up")
ax.set(title="learning rate over the run", xlabel="optimizer step k", ylabel="learning rate")
ax.legend()
plt.show()

# %% [markdown]
# The off-by-one is easy to get wrong: `LambdaLR` calls its lambda with the number of steps
# *already taken*, starting at 0. `noam_lambda` adds the 1, so a real `Adam` driven by
# `noam_schedule` runs its first step at `lr(1)` (not 0) and its k-th at `lr(k)`, reaching the
# peak exactly at step `warmup`. The optimizer is built with `lr=1.0`, because `LambdaLR`
# multiplies it by the schedule.

# %%
d_model, warmup = base["d_model"], base["warmup_steps"]
weight = torch.nn.Parameter(torch.zeros(1))
adam = torch.optim.Adam([weight], lr=1.0, betas=(0.9, 0.98), eps=1e-9)
scheduler = noam_schedule(adam, d_model, warmup)
used_lr = {}
for k in range(1, warmup + 2):
    used_lr[k] = adam.param_groups[0]["lr"]  # the lr this step runs with
    weight.grad = torch.ones(1)
    adam.step()
    scheduler.step()

for k in (1, 2, 100, warmup, warmup + 1):
    assert used_lr[k] == noam_lambda(k - 1, d_model, warmup), k
    print(f"step {k:>5}: lr {used_lr[k]:.4e}")
assert used_lr[1] == d_model**-0.5 * warmup**-1.5 > 0
assert max(used_lr, key=used_lr.get) == warmup and math.isclose(used_lr[warmup], base["peak"], rel_tol=1e-12)
