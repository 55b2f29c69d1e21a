"""Token-level losses for sequence-to-sequence training.

Both losses take logits ``(..., vocab)`` and integer targets ``(...)`` and ignore positions whose
target is the padding id. Mean reductions divide by the number of non-pad targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Logit elements processed at once by the label-smoothing kernel: bounds its float32 scratch memory
# (16 MiB) whatever the batch and vocabulary sizes.
CHUNK_ELEMENTS = 1 << 22


def _row_chunks(rows: int, vocab: int):
    step = max(1, CHUNK_ELEMENTS // vocab)
    return ((start, min(start + step, rows)) for start in range(0, rows, step))


def compute_loss(logits: Tensor, targets: Tensor, pad_token_id: int = 0) -> Tensor:
    """Mean cross-entropy over non-pad target positions.

    Args:
        logits: ``(..., vocab)`` unnormalised scores.
        targets: ``(...)`` token ids; positions equal to ``pad_token_id`` are ignored.

    Returns:
        Scalar tensor (NaN-free: 0 when every target is padding).
    """
    flat_targets = targets.reshape(-1)
    total = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        flat_targets,
        ignore_index=pad_token_id,
        reduction="sum",
    )
    return total / (flat_targets != pad_token_id).sum().clamp(min=1)


class _SmoothedCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy against the smoothed distribution, in closed form.

    With ``q`` = ``1 - eps`` on the target, ``eps / (V - 2)`` on every other non-pad token and 0 on
    padding, ``-sum_v q_v log p_v = lse(z) - (1 - eps) z_y - eps / (V - 2) (sum_v z_v - z_y - z_pad)``
    because ``sum_v q_v = 1``. The gradient is ``softmax(z) - q``. Neither ``q`` nor ``log p`` is ever
    materialised: forward keeps O(tokens) state and backward allocates only the gradient itself.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, smoothing: float, pad_token_id: int) -> Tensor:
        vocab = logits.size(-1)
        off_value = smoothing / (vocab - 2)
        lse = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)
        row_sum = torch.empty_like(lse)
        for start, end in _row_chunks(*logits.shape):
            chunk = logits[start:end].float()
            lse[start:end] = torch.logsumexp(chunk, dim=-1)
            row_sum[start:end] = chunk.sum(dim=-1)
        z_target = logits.gather(1, targets[:, None]).squeeze(1).float()
        z_pad = logits[:, pad_token_id].float()
        loss = lse - (1.0 - smoothing) * z_target - off_value * (row_sum - z_target - z_pad)
        ctx.save_for_backward(logits, targets, lse)
        ctx.smoothing, ctx.pad_token_id = smoothing, pad_token_id
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        logits, targets, lse = ctx.saved_tensors
        smoothing, pad = ctx.smoothing, ctx.pad_token_id
        off_value = smoothing / (logits.size(-1) - 2)
        rows = torch.arange(logits.size(0), device=logits.device)
        grad = torch.empty_like(logits)
        for start, end in _row_chunks(*logits.shape):
            g = (logits[start:end].float() - lse[start:end, None]).exp_()
            g.sub_(off_value)
            g[:, pad] += off_value
            g[rows[: g.size(0)], targets[start:end]] -= 1.0 - smoothing - off_value
            grad[start:end] = g.mul_(grad_loss[start:end, None])
        return grad, None, None, None


class LabelSmoothingLoss(nn.Module):
    """Cross-entropy against a label-smoothed target distribution.

    The distribution puts ``1 - smoothing`` on the target token, ``smoothing / (vocab_size - 2)`` on
    every other token except padding, and 0 on the padding token (the guide's convention; fairseq
    spreads ``smoothing / (V - 1)`` and ``F.cross_entropy(label_smoothing=)`` ``smoothing / V``).
    Positions whose target is padding contribute nothing. With ``smoothing=0`` it equals
    :func:`compute_loss`.

    Computed in closed form (memory O(tokens), not O(tokens x vocab)); float32 internally, so it
    is safe on bf16/fp16 logits under autocast.

    Args:
        vocab_size: size of the target vocabulary (> 2).
        smoothing: ``epsilon`` in ``[0, 1)``.
        pad_token_id: id of the padding token.
        reduction: ``"mean"`` over non-pad targets, ``"sum"``, or ``"none"`` (per position, 0 at pads).
    """

    def __init__(
        self, vocab_size: int, smoothing: float = 0.1, pad_token_id: int = 0, reduction: str = "mean"
    ) -> None:
        super().__init__()
        if vocab_size <= 2:
            raise ValueError(
                f"vocab_size must be > 2 to spread label smoothing over non-target, non-pad tokens; got "
                f"{vocab_size}. Check the tokenizer's vocabulary size."
            )
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(
                f"label smoothing must be in [0, 1), got {smoothing}. The paper uses 0.1; use 0 to disable."
            )
        if not 0 <= pad_token_id < vocab_size:
            raise ValueError(f"pad_token_id {pad_token_id} is outside the vocabulary [0, {vocab_size}).")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")
        self.vocab_size, self.smoothing = vocab_size, smoothing
        self.pad_token_id, self.reduction = pad_token_id, reduction

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Args: logits ``(..., vocab)``, targets ``(...)``. Returns a scalar, or ``(...)`` for ``none``."""
        if logits.size(-1) != self.vocab_size:
            raise ValueError(
                f"logits have {logits.size(-1)} classes but the loss was built for vocab_size="
                f"{self.vocab_size}; build both from the same tokenizer."
            )
        flat_logits = logits.reshape(-1, self.vocab_size)
        flat_targets = targets.reshape(-1)
        per_token = _SmoothedCrossEntropy.apply(flat_logits, flat_targets, self.smoothing, self.pad_token_id)
        not_pad = flat_targets != self.pad_token_id
        per_token = per_token * not_pad
        if self.reduction == "none":
            return per_token.view(targets.shape)
        total = per_token.sum()
        return total if self.reduction == "sum" else total / not_pad.sum().clamp(min=1)

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, smoothing={self.smoothing}, pad_token_id={self.pad_token_id}"
