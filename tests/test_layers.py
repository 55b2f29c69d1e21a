import copy
import math

import pytest
import torch

from lightning_transformer import create_combined_mask, create_padding_mask
from lightning_transformer.layers import MultiHeadAttention, sinusoidal_positions


def reference_attention(attn, x, mask, memory=None):
    """Float64 textbook attention: softmax(QK^T / sqrt(d) masked) V, fully masked rows -> 0."""
    attn = copy.deepcopy(attn).double()
    x = x.double()
    h, dh = attn.nhead, attn.head_dim
    if attn.cross:
        q = attn.q_proj(x)
        k, v = attn.kv_proj(memory.double()).chunk(2, dim=-1)
    else:
        q, k, v = attn.qkv_proj(x).chunk(3, dim=-1)
    split = lambda t: t.view(t.size(0), t.size(1), h, dh).transpose(1, 2)
    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = (weights @ v).transpose(1, 2).reshape(x.size(0), x.size(1), h * dh)
    return attn.out_proj(out)


@pytest.fixture
def batch():
    torch.manual_seed(0)
    tgt = torch.randint(3, 20, (3, 6))
    tgt[1, 4:] = 0
    tgt[2, :] = 0  # an all-padding sequence
    return tgt, torch.randn(3, 6, 16)


def test_self_attention_matches_float64_reference(batch):
    tgt, x = batch
    attn = MultiHeadAttention(16, 4).eval()
    mask = create_combined_mask(tgt)
    expected = reference_attention(attn, x, mask)
    assert torch.allclose(attn(x, mask).double(), expected, atol=1e-5)


def test_cross_attention_matches_float64_reference(batch):
    src, x = batch
    memory = torch.randn(3, 6, 16)
    attn = MultiHeadAttention(16, 4, cross=True).eval()
    mask = create_padding_mask(src)
    expected = reference_attention(attn, x, mask, memory)
    assert torch.allclose(attn(x, mask, memory=memory).double(), expected, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fully_masked_rows_give_finite_outputs_and_gradients(batch, dtype):
    tgt, x = batch
    attn = MultiHeadAttention(16, 4).to(dtype)
    x = x.to(dtype).requires_grad_()
    out = attn(x, create_combined_mask(tgt))
    out.float().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters())


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match="not divisible by nhead"):
        MultiHeadAttention(30, 4)


def test_sinusoidal_positions_follow_the_paper():
    table = sinusoidal_positions(50, 8)
    for pos in (0, 7, 49):
        for i in range(4):
            angle = pos / 10000 ** (2 * i / 8)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
