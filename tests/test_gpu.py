"""The device-sensitive paths, run on every device there is: attention kernels with fully masked rows,
the fused loss, fused Adam with clipping under mixed precision, and cached decoding.

The ``cuda`` cases carry the ``gpu`` marker and are skipped without a GPU (``benchmarks/gpu_check.sh``
runs them); the ``cpu`` cases run everywhere, so the checks themselves stay exercised.
"""

import contextlib
import copy
import math

import pytest
import torch
from copy_task import CopyTaskDataModule
from lightning.pytorch import Callback, Trainer
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_transformer import (
    ProjectedLabelSmoothingLoss,
    Seq2SeqTransformer,
    create_combined_mask,
    create_padding_mask,
)
from lightning_transformer.nn.layers import MultiHeadAttention

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
LOW_PRECISION = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu, id="cuda-bf16"),
    pytest.param("cuda", torch.float16, marks=pytest.mark.gpu, id="cuda-fp16"),
]
TINY = dict(src_vocab_size=20, tgt_vocab_size=20, d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
            dim_feedforward=64)


def padded_targets(device):
    tgt = torch.randint(3, 20, (3, 6), generator=torch.Generator().manual_seed(0))
    tgt[1, 4:] = 0
    tgt[2, :] = 0  # an all-padding sequence: its rows may attend nowhere
    return tgt.to(device)


def float64_attention(attn, x, mask):
    """Textbook attention in float64 on the CPU; fully masked rows give zeros."""
    attn, x, mask = copy.deepcopy(attn).double().cpu(), x.double().cpu(), mask.cpu()
    q, k, v = (t.view(3, 6, attn.nhead, attn.head_dim).transpose(1, 2) for t in attn.qkv_proj(x).chunk(3, -1))
    scores = (q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)).masked_fill(~mask, -math.inf)
    out = torch.softmax(scores, -1).nan_to_num(0.0) @ v
    return attn.out_proj(out.transpose(1, 2).flatten(2))


BACKENDS = {"default": None, "math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device, dtype", LOW_PRECISION)
def test_attention_with_fully_masked_rows_matches_float64_in_training(device, dtype, backend):
    if device == "cpu" and backend == "efficient":
        pytest.skip("the memory-efficient kernel is CUDA's")
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 4).to(device).train()
    x = torch.randn(3, 6, 16, device=device, requires_grad=True)
    mask = create_combined_mask(padded_targets(device))
    kernel = sdpa_kernel(BACKENDS[backend]) if BACKENDS[backend] else contextlib.nullcontext()
    with torch.autocast(device, dtype=dtype), kernel:
        out = attn(x, mask)
    out.float().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters())
    assert torch.allclose(out.double().cpu(), float64_attention(attn, x.detach(), mask), atol=5e-2)


@pytest.mark.parametrize("device, dtype", LOW_PRECISION)
def test_fused_loss_and_gradients_match_float64(device, dtype):
    torch.manual_seed(0)
    states = torch.randn(40, 16, device=device, requires_grad=True)
    weight = torch.randn(50, 16, device=device, requires_grad=True)
    targets = torch.randint(0, 50, (40,), device=device)
    with torch.autocast(device, dtype=dtype):
        loss = ProjectedLabelSmoothingLoss(50, 0.1)(states, weight, targets)
    loss.backward()
    s64, w64 = states.detach().double().cpu().requires_grad_(), weight.detach().double().cpu().requires_grad_()
    log_probs = (s64 @ w64.T).log_softmax(-1)
    smoothed = torch.full_like(log_probs, 0.1 / 48)
    smoothed[:, 0] = 0.0
    smoothed.scatter_(1, targets.cpu()[:, None], 0.9)
    keep = targets.cpu() != 0
    expected = -(smoothed * log_probs).sum(-1)[keep].mean()
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), abs=5e-2)
    assert torch.allclose(states.grad.double().cpu(), s64.grad, atol=2e-2)
    assert torch.allclose(weight.grad.double().cpu(), w64.grad, atol=2e-2)


class RecordLosses(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


@pytest.mark.parametrize("device, precision", [
    ("cpu", "bf16-mixed"),
    pytest.param("cuda", "bf16-mixed", marks=pytest.mark.gpu),
    pytest.param("cuda", "16-mixed", marks=pytest.mark.gpu),
])
def test_fused_adam_with_clipping_trains_under_mixed_precision(device, precision, tmp_path):
    torch.manual_seed(0)
    model = Seq2SeqTransformer(**TINY, dropout=0.0, scheduler="cosine", lr=3e-3, warmup_steps=5)
    record = RecordLosses()
    trainer = Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=precision,
                      gradient_clip_val=1.0, max_steps=60, overfit_batches=1, default_root_dir=tmp_path, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      limit_val_batches=0, num_sanity_val_steps=0, callbacks=[record])
    trainer.fit(model, CopyTaskDataModule(num_samples=8, batch_size=8))
    (optimizer,) = trainer.optimizers
    assert optimizer.defaults["fused"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert record.losses[-1] < 0.5 * record.losses[0]


@pytest.mark.parametrize("device", DEVICES)
def test_cached_decoding_equals_full_decoding(device):
    torch.manual_seed(0)
    model = Seq2SeqTransformer(**TINY, norm_first=True).to(device).eval()
    src = torch.randint(3, 20, (3, 7), device=device)
    src[1, 5:] = 0
    tgt = padded_targets(device)[:, :5].clamp(min=3)
    tgt[:, 0] = 1
    src_mask = create_padding_mask(src)
    with torch.no_grad():
        memory = model.encode(src, src_mask)
        full = model.decode(tgt, memory, create_combined_mask(tgt), src_mask)
        cache = model.init_cache()
        steps = [model.decode(tgt[:, t : t + 1], memory, None, src_mask, cache) for t in range(tgt.size(1))]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-4)
