"""Building blocks of the encoder-decoder: attention, feed-forward, positions, layers.

Tensor shapes: ``B`` batch, ``S`` source length, ``T`` target length, ``D`` model width,
``H`` heads. Masks are boolean with ``True`` = may attend (see :mod:`lightning_transformer.nn.masks`),
or float and added to the scores, ``-inf`` where masked (the ``nn.Transformer`` convention).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cpu_choices import cheap_dropout_pays, matmul_attention_max_keys


def use_matmul_attention(q: Tensor, keys: int, decoding: bool = False) -> bool:
    """Whether queries ``q`` over ``keys`` keys take :func:`matmul_attention` rather than SDPA.

    On CPU in float32/bfloat16/float16, SDPA's kernels can be slower than plain matmuls up to a few
    hundred keys, most of all for the few queries of an incremental ``decoding`` step; how far depends
    on the processor, so each workload is measured once per machine (:mod:`.cpu_choices`).
    """
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    mode = "train" if torch.is_grad_enabled() else "step" if decoding else "forward"
    return keys <= matmul_attention_max_keys(mode, q.size(-1), q.dtype)


def _split_mask(mask: Tensor) -> tuple[Tensor, Tensor | None]:
    """A bool or float additive mask as ``(may_attend, finite float bias or None)``."""
    if mask.dtype == torch.bool:
        return mask, None
    may_attend = mask != -math.inf
    return may_attend, mask.float().masked_fill(~may_attend, 0.0)


def matmul_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float = 0.0) -> Tensor:
    """``softmax(q k^T / sqrt(d), masked) v`` with the scores and softmax in float32.

    Shapes ``(B, H, T, d)``, ``(B, H, S, d)``, ``(B, H, S, d)``; ``mask`` broadcastable to
    ``(B, H, T, S)``, bool (True = may attend) or float (added; ``-inf`` = masked). Masked scores
    are filled in float32 with its most negative finite value, so no dtype overflows; a query with
    no key to attend gets zeros, as from SDPA.
    """
    scores = (q @ k.transpose(-2, -1)).float().mul_(q.size(-1) ** -0.5)
    if mask is not None:
        mask, bias = _split_mask(mask)
        scores = scores if bias is None else scores + bias
        scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
    weights = dropout(torch.softmax(scores, dim=-1), dropout_p, training=dropout_p > 0)
    out = weights.to(v.dtype) @ v
    return out if mask is None else out.masked_fill_(~mask.any(-1, keepdim=True), 0.0)


def sixteen_bit_dropout(x: Tensor, p: float) -> Tensor:
    """Training-mode dropout drawing a quarter of the random numbers: each 64-bit draw gives four
    16-bit ones, so ``p`` is rounded to a multiple of 1/65536 and kept values are scaled by the
    matching exact ``1 / (1 - p)``."""
    dropped = round(p * 65536)
    words = torch.randint(-(2**63), 2**63 - 1, ((x.numel() + 3) // 4,), dtype=torch.int64)
    keep = words.view(torch.int16)[: x.numel()].view(x.shape) >= dropped - 32768
    # A 0/1 tensor, not torch.where (same values): 3-4x faster forward + backward on CPU.
    return x.mul(65536 / (65536 - dropped)).mul_(keep.to(x.dtype))


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout``, or :func:`sixteen_bit_dropout` on CPUs where it was measured faster
    (once per machine: :func:`~.cpu_choices.cheap_dropout_pays`)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0 or not cheap_dropout_pays():
        return F.dropout(x, p, True)
    return sixteen_bit_dropout(x, p)


class Dropout(nn.Dropout):
    """``nn.Dropout`` through :func:`dropout`: one random draw per element was a sixth of a CPU
    training step on some processors (``benchmarks/results/profile_*``). ``inplace`` uses ``F.dropout``."""

    def forward(self, x: Tensor) -> Tensor:
        if self.inplace:
            return F.dropout(x, self.p, self.training, True)
        return dropout(x, self.p, self.training)


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention: ``F.scaled_dot_product_attention``, or
    :func:`matmul_attention` where that is measurably faster (on CPU, measured per machine).

    Self-attention projects queries, keys and values with one fused ``D -> 3D`` matmul;
    cross-attention projects the queries alone and the memory's keys and values with one fused
    ``D -> 2D`` matmul.

    Args:
        d_model: model width ``D``; must be divisible by ``nhead``.
        nhead: number of heads ``H``.
        dropout: dropout on the attention probabilities.
        cross: ``True`` for encoder-decoder attention.
    """

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, cross: bool = False) -> None:
        super().__init__()
        if d_model % nhead != 0:
            raise ValueError(
                f"d_model={d_model} is not divisible by nhead={nhead}; choose nhead among the divisors "
                f"of d_model (the paper: 512/8, 1024/16)."
            )
        self.nhead, self.head_dim, self.dropout, self.cross = nhead, d_model // nhead, dropout, cross
        if cross:
            self.q_proj = nn.Linear(d_model, d_model)
            self.kv_proj = nn.Linear(d_model, 2 * d_model)
        else:
            self.qkv_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def _split_heads(self, x: Tensor, n: int) -> tuple[Tensor, ...]:
        batch, length, _ = x.shape
        # (B, L, n*D) -> n tensors of (B, H, L, D/H)
        return x.view(batch, length, n, self.nhead, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: Tensor, mask: Tensor | None = None, memory: Tensor | None = None,
                cache: dict[str, Tensor] | None = None) -> Tensor:
        """Args:
            x: queries (and, for self-attention, keys/values) ``(B, T, D)``.
            mask: broadcastable to ``(B, H, T, S)``: bool, or float added to the scores.
            memory: encoder output ``(B', S, D)``; required iff ``cross``. ``B'`` may divide ``B``:
                then ``B / B'`` consecutive query rows share each memory row (beam search).
            cache: incremental decoding state, updated in place: self-attention appends this
                step's keys/values to ``cache["k"]``/``cache["v"]``; cross-attention projects
                ``memory`` once and reuses it.

        Returns:
            ``(B, T, D)``.
        """
        q, k, v = self._project(x, memory, cache)
        batch, _, length, _ = q.shape
        group = batch // k.size(0)
        if group > 1:  # consecutive query rows share one memory row: fold them into query positions
            q = q.unflatten(0, (k.size(0), group)).transpose(1, 2).flatten(2, 3)
        dropout_p = self.dropout if self.training else 0.0
        if use_matmul_attention(q, k.size(2), decoding=cache is not None):
            out = matmul_attention(q, k, v, mask, dropout_p)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # (B, H, T, D/H)
        if group > 1:
            out = out.unflatten(2, (group, length)).transpose(1, 2).flatten(0, 1)
        return self.out_proj(out.transpose(1, 2).flatten(2))


    def _project(self, x: Tensor, memory: Tensor | None, cache: dict[str, Tensor] | None) -> tuple[Tensor, ...]:
        """Queries ``(B, H, T, D/H)`` and keys, values ``(B', H, S, D/H)``, through ``cache`` if given."""
        if self.cross:
            (q,) = self._split_heads(self.q_proj(x), 1)
            if cache is not None and "k" in cache:
                k, v = cache["k"], cache["v"]
            else:
                k, v = self._split_heads(self.kv_proj(memory), 2)
        else:
            q, k, v = self._split_heads(self.qkv_proj(x), 3)
            if cache is not None and "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
        if cache is not None:
            cache["k"], cache["v"] = k, v
        return q, k, v

    def attention_weights(self, x: Tensor, mask: Tensor | None = None, memory: Tensor | None = None) -> Tensor:
        """The probabilities ``(B, H, T, S)`` that :meth:`forward` averages values with, without dropout.

        For inspection (heatmaps, probes): training never materialises them. A query with no key
        to attend gets a row of zeros, as in :meth:`forward`.
        """
        q, k, _ = self._project(x, memory, None)
        scores = (q @ k.transpose(-2, -1)).float() * self.head_dim**-0.5
        if mask is None:
            return scores.softmax(-1)
        mask, bias = _split_mask(mask)
        scores = scores if bias is None else scores + bias
        weights = scores.masked_fill(~mask, -math.inf).softmax(-1)
        return weights.nan_to_num(0.0)


class FeedForward(nn.Module):
    """Position-wise ``Linear -> ReLU -> dropout -> Linear``."""

    def __init__(self, d_model: int, dim_feedforward: int, activation_dropout: float = 0.0) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.activation_dropout = Dropout(activation_dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.activation_dropout(F.relu(self.linear1(x))))


def sinusoidal_positions(max_len: int, d_model: int) -> Tensor:
    """``(max_len, d_model)`` table: ``sin`` on even, ``cos`` on odd channels (paper, section 3.5)."""
    # On the CPU explicitly, so that a model built under ``torch.device("meta")`` still gets real values.
    position = torch.arange(max_len, dtype=torch.float64, device="cpu")[:, None]
    inv_freq = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64, device="cpu") / d_model)
    table = torch.zeros(max_len, d_model, dtype=torch.float64, device="cpu")
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)[:, : d_model // 2]
    return table.float()


class Embeddings(nn.Module):
    """Token embedding scaled by ``sqrt(d_model)``, plus sinusoidal positions, then dropout."""

    def __init__(self, token_embedding: nn.Embedding, max_len: int, dropout: float) -> None:
        super().__init__()
        self.token = token_embedding
        self.scale = math.sqrt(token_embedding.embedding_dim)
        self.dropout = Dropout(dropout)
        # A constant, so not a buffer: DDP would broadcast it from rank 0 before every forward.
        self.positions = sinusoidal_positions(max_len, token_embedding.embedding_dim)

    def _apply(self, fn, recurse: bool = True):
        """Move and cast the position table with the module (``to``, ``cuda``, ``half``), as a buffer would be."""
        self.positions = fn(self.positions)
        return super()._apply(fn, recurse)

    def forward(self, ids: Tensor, offset: int = 0) -> Tensor:
        """``(B, L)`` ids at positions ``offset .. offset + L - 1`` -> ``(B, L, D)``."""
        length = ids.size(1) + offset
        if length > self.positions.size(0):
            raise ValueError(
                f"sequence of length {length} exceeds the model's max_len={self.positions.size(0)}; "
                "raise model.max_len or drop longer sentences in the data module (max_length)."
            )
        return self.dropout(self.token(ids) * self.scale + self.positions[offset:length])


class _Residual(nn.Module):
    """``x + dropout(f(x))`` then LayerNorm (post-norm, the paper), or ``x + dropout(f(norm(x)))``."""

    def __init__(self, d_model: int, dropout: float, norm_first: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)
        self.norm_first = norm_first

    def forward(self, x: Tensor, sublayer) -> Tensor:
        if self.norm_first:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward, each wrapped in a residual connection."""

    def __init__(
        self, d_model: int, nhead: int, dim_feedforward: int, dropout: float,
        attention_dropout: float = 0.0, activation_dropout: float = 0.0, norm_first: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, nhead, attention_dropout)
        self.feed_forward = FeedForward(d_model, dim_feedforward, activation_dropout)
        self.attn_block = _Residual(d_model, dropout, norm_first)
        self.ff_block = _Residual(d_model, dropout, norm_first)

    def forward(self, x: Tensor, src_mask: Tensor | None, cache: dict[str, Tensor] | None = None) -> Tensor:
        """``(B, S, D)`` with ``src_mask`` ``(B, 1, 1, S)`` -> ``(B, S, D)``.

        Under a causal mask this is a decoder-only layer; ``cache`` (updated in place) then makes
        ``x`` only the new positions, as in :class:`DecoderLayer`.
        """
        x = self.attn_block(x, lambda h: self.self_attn(h, src_mask, cache=cache))
        return self.ff_block(x, self.feed_forward)


class DecoderLayer(nn.Module):
    """Masked self-attention, cross-attention over the encoder output, then feed-forward."""

    def __init__(
        self, d_model: int, nhead: int, dim_feedforward: int, dropout: float,
        attention_dropout: float = 0.0, activation_dropout: float = 0.0, norm_first: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, nhead, attention_dropout)
        self.cross_attn = MultiHeadAttention(d_model, nhead, attention_dropout, cross=True)
        self.feed_forward = FeedForward(d_model, dim_feedforward, activation_dropout)
        self.self_block = _Residual(d_model, dropout, norm_first)
        self.cross_block = _Residual(d_model, dropout, norm_first)
        self.ff_block = _Residual(d_model, dropout, norm_first)

    def forward(self, x: Tensor, memory: Tensor, tgt_mask: Tensor | None, memory_mask: Tensor | None,
                cache: dict[str, dict[str, Tensor]] | None = None) -> Tensor:
        """``(B, T, D)`` over ``memory`` ``(B, S, D)``; ``tgt_mask`` ``(B, 1, T, T)``, ``memory_mask`` ``(B, 1, 1, S)``.

        With ``cache`` (``{"self": {}, "cross": {}}`` at the first step) ``x`` holds only the new
        positions, which attend to every cached one.
        """
        self_cache, cross_cache = (cache["self"], cache["cross"]) if cache is not None else (None, None)
        x = self.self_block(x, lambda h: self.self_attn(h, tgt_mask, cache=self_cache))
        x = self.cross_block(x, lambda h: self.cross_attn(h, memory_mask, memory=memory, cache=cross_cache))
        return self.ff_block(x, self.feed_forward)
