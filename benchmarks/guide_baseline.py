"""The encoder-decoder Transformer written the way the guide this project follows writes it.

A speed baseline for ``benchmarks/throughput.py``, kept out of the package on purpose. It follows
the Annotated Transformer's structure and its costs: ``clones`` of layers, attention with four
separate ``Linear`` projections and ``scores.masked_fill(mask == 0, -1e9)``, a hand-written
LayerNorm (unbiased std), pre-norm ``SublayerConnection`` blocks with a final LayerNorm, a
``Generator`` that returns log-probabilities, a ``LabelSmoothing`` loss that materialises the full
smoothed target distribution for ``KLDivLoss(reduction="sum")``, and a greedy decoder that re-runs
the decoder over the whole prefix at every step (no key/value cache). The guide has no beam search.

Two departures, both so that the three implementations of the benchmark have the same size and
regularisation: source, target and output embeddings share one table (the guide builds three;
``Generator`` therefore has no bias), and the dropout on attention probabilities and after the
feed-forward ReLU is a parameter (the benchmark sets both to 0, as the project and fairseq do).

    model = make_model(vocab=8000, n_layers=3, d_model=256, d_ff=1024, heads=4)
    src_mask, tgt_mask = make_masks(src, tgt_in, pad=0)
    loss = loss_compute(model, LabelSmoothing(8000, padding_idx=0, smoothing=0.1), src, tgt_in, tgt_out, pad=0)
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def clones(module: nn.Module, n: int) -> nn.ModuleList:
    """``n`` independent deep copies of ``module``."""
    return nn.ModuleList(copy.deepcopy(module) for _ in range(n))


def subsequent_mask(size: int, device=None) -> Tensor:
    """``(1, size, size)`` bool, ``True`` where position ``i`` may look at ``j <= i``."""
    return torch.triu(torch.ones(1, size, size, device=device), diagonal=1) == 0


def make_masks(src: Tensor, tgt_in: Tensor, pad: int) -> tuple[Tensor, Tensor]:
    """Source padding mask ``(B, 1, S)`` and target padding-and-future mask ``(B, T, T)``."""
    src_mask = (src != pad).unsqueeze(-2)
    tgt_mask = (tgt_in != pad).unsqueeze(-2) & subsequent_mask(tgt_in.size(-1), tgt_in.device)
    return src_mask, tgt_mask


class LayerNorm(nn.Module):
    """LayerNorm as the guide writes it: ``a * (x - mean) / (std + eps) + b``."""

    def __init__(self, features: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.a_2 = nn.Parameter(torch.ones(features))
        self.b_2 = nn.Parameter(torch.zeros(features))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True)
        return self.a_2 * (x - mean) / (std + self.eps) + self.b_2


class SublayerConnection(nn.Module):
    """Pre-norm residual block: ``x + dropout(sublayer(norm(x)))``."""

    def __init__(self, size: int, dropout: float) -> None:
        super().__init__()
        self.norm = LayerNorm(size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, sublayer) -> Tensor:
        return x + self.dropout(sublayer(self.norm(x)))


def attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None = None,
              dropout: nn.Dropout | None = None) -> tuple[Tensor, Tensor]:
    """Scaled dot-product attention over ``(B, H, L, d_k)`` tensors; returns output and weights."""
    d_k = query.size(-1)
    scores = torch.matmul(query, key.transpose(-2, -1)) / math.sqrt(d_k)  # (B, H, Lq, Lk)
    if mask is not None:
        scores = scores.masked_fill(mask == 0, -1e9)
    p_attn = scores.softmax(dim=-1)
    if dropout is not None:
        p_attn = dropout(p_attn)
    return torch.matmul(p_attn, value), p_attn


class MultiHeadedAttention(nn.Module):
    """``h`` heads; query, key, value and output each have their own ``Linear``."""

    def __init__(self, h: int, d_model: int, dropout: float = 0.1) -> None:
        super().__init__()
        assert d_model % h == 0
        self.d_k, self.h = d_model // h, h
        self.linears = clones(nn.Linear(d_model, d_model), 4)
        self.attn = None  # the guide keeps the last attention weights for plotting
        self.dropout = nn.Dropout(p=dropout)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is not None:
            mask = mask.unsqueeze(1)  # the same mask for every head
        nbatches = query.size(0)
        query, key, value = [
            lin(x).view(nbatches, -1, self.h, self.d_k).transpose(1, 2)
            for lin, x in zip(self.linears, (query, key, value))
        ]
        x, self.attn = attention(query, key, value, mask=mask, dropout=self.dropout)
        x = x.transpose(1, 2).contiguous().view(nbatches, -1, self.h * self.d_k)
        return self.linears[-1](x)


class PositionwiseFeedForward(nn.Module):
    """``w_2(dropout(relu(w_1(x))))``."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_ff)
        self.w_2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(self.dropout(self.w_1(x).relu()))


class Embeddings(nn.Module):
    """Token lookup scaled by ``sqrt(d_model)``."""

    def __init__(self, d_model: int, vocab: int) -> None:
        super().__init__()
        self.lut = nn.Embedding(vocab, d_model)
        self.d_model = d_model

    def forward(self, x: Tensor) -> Tensor:
        return self.lut(x) * math.sqrt(self.d_model)


class PositionalEncoding(nn.Module):
    """Adds the sinusoidal table, then dropout."""

    def __init__(self, d_model: int, dropout: float, max_len: int = 5000) -> None:
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        position = torch.arange(0, max_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2) * -(math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe.unsqueeze(0))

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(x + self.pe[:, : x.size(1)].requires_grad_(False))


class EncoderLayer(nn.Module):
    def __init__(self, size: int, self_attn: nn.Module, feed_forward: nn.Module, dropout: float) -> None:
        super().__init__()
        self.self_attn, self.feed_forward = self_attn, feed_forward
        self.sublayer = clones(SublayerConnection(size, dropout), 2)
        self.size = size

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = self.sublayer[0](x, lambda x: self.self_attn(x, x, x, mask))
        return self.sublayer[1](x, self.feed_forward)


class DecoderLayer(nn.Module):
    def __init__(self, size: int, self_attn: nn.Module, src_attn: nn.Module, feed_forward: nn.Module,
                 dropout: float) -> None:
        super().__init__()
        self.self_attn, self.src_attn, self.feed_forward = self_attn, src_attn, feed_forward
        self.sublayer = clones(SublayerConnection(size, dropout), 3)
        self.size = size

    def forward(self, x: Tensor, memory: Tensor, src_mask: Tensor, tgt_mask: Tensor) -> Tensor:
        m = memory
        x = self.sublayer[0](x, lambda x: self.self_attn(x, x, x, tgt_mask))
        x = self.sublayer[1](x, lambda x: self.src_attn(x, m, m, src_mask))
        return self.sublayer[2](x, self.feed_forward)


class Encoder(nn.Module):
    def __init__(self, layer: EncoderLayer, n: int) -> None:
        super().__init__()
        self.layers = clones(layer, n)
        self.norm = LayerNorm(layer.size)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x)


class Decoder(nn.Module):
    def __init__(self, layer: DecoderLayer, n: int) -> None:
        super().__init__()
        self.layers = clones(layer, n)
        self.norm = LayerNorm(layer.size)

    def forward(self, x: Tensor, memory: Tensor, src_mask: Tensor, tgt_mask: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, memory, src_mask, tgt_mask)
        return self.norm(x)


class Generator(nn.Module):
    """Output projection followed by ``log_softmax``."""

    def __init__(self, d_model: int, vocab: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, vocab, bias=False)  # bias-free so that it can be tied

    def forward(self, x: Tensor) -> Tensor:
        return F.log_softmax(self.proj(x), dim=-1)


class EncoderDecoder(nn.Module):
    def __init__(self, encoder: Encoder, decoder: Decoder, src_embed: nn.Module, tgt_embed: nn.Module,
                 generator: Generator) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.src_embed, self.tgt_embed, self.generator = src_embed, tgt_embed, generator

    def forward(self, src: Tensor, tgt: Tensor, src_mask: Tensor, tgt_mask: Tensor) -> Tensor:
        """Decoder states ``(B, T, D)``; ``generator`` turns them into log-probabilities."""
        return self.decode(self.encode(src, src_mask), src_mask, tgt, tgt_mask)

    def encode(self, src: Tensor, src_mask: Tensor) -> Tensor:
        return self.encoder(self.src_embed(src), src_mask)

    def decode(self, memory: Tensor, src_mask: Tensor, tgt: Tensor, tgt_mask: Tensor) -> Tensor:
        return self.decoder(self.tgt_embed(tgt), memory, src_mask, tgt_mask)


def make_model(vocab: int, n_layers: int = 6, d_model: int = 512, d_ff: int = 2048, heads: int = 8,
               dropout: float = 0.1, attention_dropout: float = 0.1,
               activation_dropout: float = 0.1) -> EncoderDecoder:
    """The guide's ``make_model`` with one shared embedding table, tied to the output projection."""
    c = copy.deepcopy
    attn = MultiHeadedAttention(heads, d_model, attention_dropout)
    ff = PositionwiseFeedForward(d_model, d_ff, activation_dropout)
    position = PositionalEncoding(d_model, dropout)
    embed = Embeddings(d_model, vocab)
    model = EncoderDecoder(
        Encoder(EncoderLayer(d_model, c(attn), c(ff), dropout), n_layers),
        Decoder(DecoderLayer(d_model, c(attn), c(attn), c(ff), dropout), n_layers),
        nn.Sequential(embed, c(position)),
        nn.Sequential(embed, c(position)),
        Generator(d_model, vocab),
    )
    model.generator.proj.weight = embed.lut.weight
    for p in model.parameters():  # the guide's Glorot initialisation of every matrix
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
    return model


class LabelSmoothing(nn.Module):
    """KL divergence to a smoothed target distribution built in full, ``(tokens, vocab)``.

    ``1 - smoothing`` on the target, ``smoothing / (size - 2)`` elsewhere, 0 in the padding column
    and 0 on every row whose target is padding.
    """

    def __init__(self, size: int, padding_idx: int, smoothing: float = 0.0) -> None:
        super().__init__()
        self.criterion = nn.KLDivLoss(reduction="sum")
        self.padding_idx, self.size = padding_idx, size
        self.confidence, self.smoothing = 1.0 - smoothing, smoothing
        self.true_dist = None  # the guide keeps the last distribution for plotting

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        assert x.size(1) == self.size
        true_dist = x.detach().clone()
        true_dist.fill_(self.smoothing / (self.size - 2))
        true_dist.scatter_(1, target.unsqueeze(1), self.confidence)
        true_dist[:, self.padding_idx] = 0
        pad_rows = torch.nonzero(target == self.padding_idx)
        if pad_rows.numel() > 0:
            true_dist.index_fill_(0, pad_rows.view(-1), 0.0)
        self.true_dist = true_dist
        return self.criterion(x, true_dist.clone().detach())


def loss_compute(model: EncoderDecoder, criterion: LabelSmoothing, src: Tensor, tgt_in: Tensor, tgt_out: Tensor,
                 pad: int) -> Tensor:
    """The guide's ``SimpleLossCompute``: summed smoothed loss over the generator, divided by non-pad tokens."""
    src_mask, tgt_mask = make_masks(src, tgt_in, pad)
    x = model.generator(model(src, tgt_in, src_mask, tgt_mask))
    n_tokens = (tgt_out != pad).sum()
    return criterion(x.contiguous().view(-1, x.size(-1)), tgt_out.contiguous().view(-1)) / n_tokens


@torch.no_grad()
def greedy_decode(model: EncoderDecoder, src: Tensor, max_len: int, pad: int, start_symbol: int,
                  end_symbol: int) -> Tensor:
    """The guide's greedy decoder, batched: the whole prefix goes through the decoder at every step.

    Padding and the start symbol are never picked (as in the project's decoder, so that output
    lengths compare); decoding stops once every sentence has produced ``end_symbol``.

    Returns:
        ``(B, <= max_len)`` generated ids without the start symbol; a row runs on after its end symbol.
    """
    src_mask = (src != pad).unsqueeze(-2)
    memory = model.encode(src, src_mask)
    ys = torch.full((src.size(0), 1), start_symbol, dtype=src.dtype, device=src.device)
    for _ in range(max_len):
        out = model.decode(memory, src_mask, ys, subsequent_mask(ys.size(1), src.device))
        prob = model.generator(out[:, -1])
        prob[:, [pad, start_symbol]] = -math.inf
        ys = torch.cat([ys, prob.argmax(dim=-1, keepdim=True)], dim=1)
        if (ys == end_symbol).any(dim=1).all():
            break
    return ys[:, 1:]
