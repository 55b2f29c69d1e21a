"""Token-level losses for sequence-to-sequence training.

The losses take logits ``(..., vocab)`` (or, for :class:`ProjectedLabelSmoothingLoss`, decoder states
``(..., d_model)`` and the output projection) with integer targets ``(...)``, and ignore positions
whose target is the padding id. Mean reductions divide by the number of non-pad targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def chunk_elements(device: torch.device) -> int:
    """Logit elements the label-smoothing kernel processes at once on ``device``.

    It bounds the kernel's scratch memory (a few float32 buffers of this size) whatever the batch
    and vocabulary. CPU: 2^22 (16 MiB a buffer), small enough for a chunk's several passes to stay
    mostly in cache; more chunks cost a CPU nothing. Other devices (CUDA): 2^26 (256 MiB a
    buffer), because each chunk costs ~50 kernel launches: the base config's 25k tokens x 37k
    vocabulary then take 14 chunks instead of 222, so the loss is bound by memory traffic, not by
    launches (``tests/test_losses.py`` counts its operators).
    """
    return 1 << 22 if device.type == "cpu" else 1 << 26


def _row_chunks(rows: int, vocab: int, device: torch.device):
    step = max(1, chunk_elements(device) // vocab)
    return ((start, min(start + step, rows)) for start in range(0, rows, step))


def _smoothed_terms(z: Tensor, targets: Tensor, smoothing: float, pad: int,
                    with_grad: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """Float32 ``(smoothed loss, nll)`` per row of logits ``z`` ``(N, V)``, and with ``with_grad`` the
    gradient ``softmax(z) - q`` in ``z``'s dtype.

    ``-sum_v q_v log p_v`` in closed form: ``q`` puts ``1 - eps`` on the target, ``eps / (V - 2)``
    on every other non-pad token and 0 on padding, so ``q`` is never built. The arithmetic is
    float32 (on this CPU bf16 element-wise kernels are slower than float32 ones;
    ``benchmarks/results/profile_*``), on at most two ``(N, V)`` buffers updated in place.
    """
    vocab = z.size(-1)
    off_value = smoothing / (vocab - 2)
    if with_grad:
        # One exp pass serves loss and gradient: lse = max z - log max p, since the largest logit
        # has the largest probability, which cannot underflow.
        zf = z.to(torch.float32, copy=True)
        probs = torch.softmax(zf, dim=-1)
        lse = zf.amax(-1) - probs.amax(-1).log()
        target = zf.gather(1, targets[:, None]).squeeze(1) - lse
        # Padding is zeroed rather than subtracted: a model that masks it out of its output with
        # -inf would otherwise get inf - inf = NaN.
        zf[:, pad] = 0.0
        others = zf.sum(-1) - (vocab - 1) * lse - target
    else:
        log_probs = torch.log_softmax(z.float(), dim=-1)
        target = log_probs.gather(1, targets[:, None]).squeeze(1)
        log_probs[:, pad] = 0.0
        others = log_probs.sum(-1) - target
    loss, nll = -(1.0 - smoothing) * target - off_value * others, -target
    if not with_grad:
        return loss, nll, None
    grad = probs.sub_(off_value)
    grad[:, pad] += off_value
    grad[torch.arange(z.size(0), device=z.device), targets] -= 1.0 - smoothing - off_value
    return loss, nll, grad.to(z.dtype)


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
        loss = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)
        for start, end in _row_chunks(*logits.shape, logits.device):
            loss[start:end] = _smoothed_terms(logits[start:end], targets[start:end], smoothing, pad_token_id)[0]
        ctx.save_for_backward(logits, targets)
        ctx.smoothing, ctx.pad_token_id = smoothing, pad_token_id
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        logits, targets = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start, end in _row_chunks(*logits.shape, logits.device):
            g = _smoothed_terms(logits[start:end], targets[start:end], ctx.smoothing, ctx.pad_token_id, True)[2]
            grad[start:end] = g.mul_(grad_loss[start:end, None])
        return grad, None, None, None


def _projected_sums(states: Tensor, weight: Tensor, targets: Tensor, smoothing: float, pad_token_id: int,
                    states_grad: bool, weight_grad: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """``(smoothed loss sum, nll sum, d/dstates, d/dweight)`` over non-pad rows of ``states @ weight.T``.

    States ``(N, D)`` and weight ``(V, D)`` are projected a chunk of rows at a time; each chunk's
    logits live only inside the loop. The gradients of the sums, if asked for, are accumulated in
    the same pass, so no ``(N, V)`` tensor exists. On a CPU padded rows are dropped before
    projecting (a third of a batch of unsorted sentences); on an accelerator, and under
    ``torch.compile``, they are zeroed instead: a data-dependent row count would cost a host sync
    every step, or a graph break.
    """
    loss_sum = torch.zeros((), dtype=torch.float32, device=states.device)
    nll_sum = torch.zeros_like(loss_sum)
    grad_states = torch.zeros_like(states) if states_grad else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight_grad else None
    keep, rows = targets != pad_token_id, None
    if states.device.type == "cpu" and not torch.compiler.is_compiling():
        rows = keep.nonzero().squeeze(1)
        states, targets, keep = states.index_select(0, rows), targets.index_select(0, rows), keep[rows]
    keep = keep[:, None]
    need_grad = states_grad or weight_grad
    for start, end in _row_chunks(states.size(0), weight.size(0), states.device):
        chunk_targets, chunk_keep = targets[start:end], keep[start:end]
        # Padded rows are zeroed in the states, so they add nothing to the weight's gradient.
        chunk_states = states[start:end] * chunk_keep
        z = F.linear(chunk_states, weight)  # autocast, if on, picks the matmul dtype
        loss, nll, grad = _smoothed_terms(z, chunk_targets, smoothing, pad_token_id, need_grad)
        del z
        loss_sum += loss @ chunk_keep.squeeze(1).float()
        nll_sum += nll @ chunk_keep.squeeze(1).float()
        if not need_grad:
            continue
        if grad_states is not None:
            chunk_grad = (grad @ weight) * chunk_keep
            if rows is None:
                grad_states[start:end] = chunk_grad
            else:
                grad_states.index_copy_(0, rows[start:end], chunk_grad.to(grad_states.dtype))
        if grad_weight is not None and grad.dtype == grad_weight.dtype == chunk_states.dtype:
            grad_weight.addmm_(grad.t(), chunk_states)  # no weight-sized temporary
        elif grad_weight is not None:
            grad_weight += grad.t() @ chunk_states
    return loss_sum, nll_sum, grad_states, grad_weight


class _ProjectedSmoothedCrossEntropy(torch.autograd.Function):
    """:func:`_projected_sums` as an autograd function. Because the result is a sum, forward already
    has the gradients and backward merely scales them. Returns ``(smoothed loss sum, nll sum)``; the
    nll is not differentiable.
    """

    @staticmethod
    def forward(ctx, states: Tensor, weight: Tensor, targets: Tensor, smoothing: float, pad_token_id: int):
        loss_sum, nll_sum, grad_states, grad_weight = _projected_sums(
            states, weight, targets, smoothing, pad_token_id, *ctx.needs_input_grad[:2])
        ctx.save_for_backward(grad_states, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(nll_sum)
        return loss_sum, nll_sum

    @staticmethod
    def backward(ctx, grad_loss: Tensor, grad_nll: Tensor):
        grad_states, grad_weight = ctx.saved_tensors
        # Scaled in place: these buffers exist only for this backward, and a copy of the
        # weight-sized gradient would be the largest allocation of the loss.
        if grad_states is not None:
            grad_states.mul_(grad_loss.to(grad_states.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss).to(ctx.weight_dtype)
        return grad_states, grad_weight, None, None, None


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
        per_token = torch.where(not_pad, per_token, 0.0)
        if self.reduction == "none":
            return per_token.view(targets.shape)
        total = per_token.sum()
        return total if self.reduction == "sum" else total / not_pad.sum().clamp(min=1)

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, smoothing={self.smoothing}, pad_token_id={self.pad_token_id}"


class ProjectedLabelSmoothingLoss(LabelSmoothingLoss):
    """:class:`LabelSmoothingLoss` fused with the output projection ``logits = states @ weight.T``.

    Same distribution and values as projecting first and calling :class:`LabelSmoothingLoss`, but
    the ``(tokens, vocab)`` logits are never materialised, in forward or backward: peak memory is a
    chunk of logits plus one weight-sized gradient (see ``benchmarks/loss_memory.py``).

    Args: as :class:`LabelSmoothingLoss`; ``reduction`` is ``"mean"`` or ``"sum"``.
    """

    def __init__(self, vocab_size: int, smoothing: float = 0.1, pad_token_id: int = 0, reduction: str = "mean") -> None:
        super().__init__(vocab_size, smoothing, pad_token_id, reduction)
        if reduction == "none":
            raise ValueError("ProjectedLabelSmoothingLoss reduces over tokens; use reduction='mean' or 'sum', "
                             "or LabelSmoothingLoss on explicit logits for per-token losses.")

    def forward(self, states: Tensor, weight: Tensor, targets: Tensor, return_nll: bool = False):
        """Args: states ``(..., D)``, weight ``(vocab, D)``, targets ``(...)``.

        Returns the reduced smoothed loss, or ``(loss, nll)`` with ``return_nll`` (nll detached).
        """
        if weight.size(0) != self.vocab_size or weight.size(1) != states.size(-1):
            raise ValueError(
                f"the output projection has shape {tuple(weight.shape)} but the loss expects "
                f"({self.vocab_size}, {states.size(-1)}) for vocab_size={self.vocab_size} and states of width "
                f"{states.size(-1)}; build the model and the loss from the same tokenizer."
            )
        flat_targets, flat_states = targets.reshape(-1), states.reshape(-1, states.size(-1))
        if torch.is_grad_enabled() and (states.requires_grad or weight.requires_grad):
            loss, nll = _ProjectedSmoothedCrossEntropy.apply(
                flat_states, weight, flat_targets, self.smoothing, self.pad_token_id)
        else:  # e.g. evaluation: needs_input_grad would still ask for the weight's (a parameter's) gradient
            loss, nll = _projected_sums(flat_states, weight, flat_targets, self.smoothing, self.pad_token_id,
                                        False, False)[:2]
        if self.reduction == "mean":
            count = (flat_targets != self.pad_token_id).sum().clamp(min=1)
            loss, nll = loss / count, nll / count
        return (loss, nll) if return_nll else loss
