import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_transformer import create_combined_mask, create_padding_mask
from lightning_transformer.nn import layers
from lightning_transformer.nn.layers import (
    Dropout,
    MultiHeadAttention,
    matmul_attention,
    sinusoidal_positions,
    use_matmul_attention,
)


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

    def split(t):
        return t.view(t.size(0), t.size(1), h, dh).transpose(1, 2)

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


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_attention_weights_are_the_ones_forward_applies(batch, cross):
    tokens, x = batch
    memory = torch.randn(3, 6, 16) if cross else None
    attn = MultiHeadAttention(16, 4, cross=cross).eval()
    mask = create_padding_mask(tokens) if cross else create_combined_mask(tokens)
    weights = attn.attention_weights(x, mask, memory)
    assert weights.shape == (3, 4, 6, 6)
    assert (weights.masked_select(~mask) == 0).all()  # nothing on masked keys: not even a tiny leak
    rows = weights.sum(-1)
    assert torch.allclose(rows, mask.any(-1).float().expand_as(rows))  # 1, or 0 with no key to attend
    values = (attn.kv_proj(memory).chunk(2, -1)[1] if cross else attn.qkv_proj(x).chunk(3, -1)[2])
    values = values.view(3, 6, 4, 4).transpose(1, 2)
    rebuilt = attn.out_proj((weights @ values).transpose(1, 2).flatten(2))
    assert torch.allclose(rebuilt, attn(x, mask, memory=memory), atol=1e-5)


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


@pytest.fixture(params=[True, False], ids=["16-bit masks", "F.dropout"])
def cheap_dropout(request, monkeypatch):
    """Both dropout paths, whichever this CPU measured faster."""
    monkeypatch.setattr(layers, "cheap_dropout_pays", lambda: request.param)
    return request.param


@pytest.fixture
def matmul_below(monkeypatch):
    """Pins the measured attention crossover, so a test takes the path it is about on any CPU."""
    def pin(keys: int) -> None:
        monkeypatch.setattr(layers, "matmul_attention_max_keys", lambda mode, head_dim, dtype: keys)
    return pin


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_dropout_keeps_the_expected_fraction_and_the_mean(p, cheap_dropout):
    torch.manual_seed(0)
    x = torch.ones(1000, 1000, requires_grad=True)
    out = Dropout(p).train()(x)
    kept = out != 0
    assert kept.float().mean().item() == pytest.approx(1 - p, abs=3e-3)
    assert out.mean().item() == pytest.approx(1.0, abs=5e-3)
    assert torch.allclose(out[kept], torch.tensor(1 / (1 - p)), rtol=1e-4)
    out.sum().backward()
    assert torch.equal(x.grad, out.detach())  # d(x * mask)/dx = mask


def test_dropout_is_seeded_per_element_and_off_in_eval(cheap_dropout):
    x = torch.randn(3, 5, 7).bfloat16()
    dropout = Dropout(0.5).train()
    torch.manual_seed(1)
    first = dropout(x)
    torch.manual_seed(1)
    assert torch.equal(first, dropout(x)) and first.dtype == torch.bfloat16 and first.shape == x.shape
    assert (first == 0).any() and (first != 0).any()
    assert dropout.eval()(x) is x


def sdpa_path(backend):
    def attend(q, k, v, mask):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return attend


ATTENTION_PATHS = {
    "sdpa_default": F.scaled_dot_product_attention,
    "sdpa_math": sdpa_path(SDPBackend.MATH),
    "matmul": matmul_attention,
}


@pytest.mark.parametrize("path", ATTENTION_PATHS)
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_every_attention_path_matches_float64_reference(path, dtype, atol):
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 6, 8) for _ in range(3))
    tgt = torch.randint(3, 20, (3, 6))
    tgt[1, 4:] = 0
    tgt[2, :] = 0  # an all-padding sequence: its rows may attend nowhere
    mask = create_combined_mask(tgt)
    reference = [t.double().requires_grad_() for t in (q, k, v)]
    scores = (reference[0] @ reference[1].transpose(-1, -2) / math.sqrt(8)).masked_fill(~mask, float("-inf"))
    expected = torch.softmax(scores, dim=-1).nan_to_num(0.0) @ reference[2]
    attendable = mask.any(-1, keepdim=True).expand_as(expected)
    expected[attendable].sum().backward()
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = ATTENTION_PATHS[path](*leaves, mask)
    out.float()[attendable].sum().backward()
    assert torch.isfinite(out).all()
    assert torch.allclose(out.double(), expected.detach(), atol=atol)  # rows with no key give zeros on every path
    for leaf, ref in zip(leaves, reference):
        assert torch.isfinite(leaf.grad).all()
        assert torch.allclose(leaf.grad.double(), ref.grad, atol=5 * atol)


def test_matmul_attention_is_chosen_up_to_the_length_measured_for_the_workload(monkeypatch):
    asked = []

    def measured(mode, head_dim, dtype):
        asked.append((mode, head_dim, dtype))
        return {"train": 256, "forward": 32, "step": 128}[mode]

    monkeypatch.setattr(layers, "matmul_attention_max_keys", measured)
    bf16, step = torch.zeros(2, 4, 5, 8, dtype=torch.bfloat16), torch.zeros(2, 4, 1, 8)
    assert use_matmul_attention(bf16, 256) and not use_matmul_attention(bf16, 257)
    with torch.no_grad():
        assert use_matmul_attention(bf16, 32) and not use_matmul_attention(bf16, 33)
        assert use_matmul_attention(step, 128, decoding=True) and not use_matmul_attention(step, 129, decoding=True)
        assert not use_matmul_attention(step.double(), 1, decoding=True)  # float64 references keep SDPA
    assert asked[::2] == [("train", 8, torch.bfloat16), ("forward", 8, torch.bfloat16), ("step", 8, torch.float32)]
    monkeypatch.setattr(layers, "matmul_attention_max_keys", lambda mode, head_dim, dtype: 0)  # SDPA always won
    assert not use_matmul_attention(bf16, 16)


@pytest.mark.parametrize("grad", [True, False], ids=["with grad", "without grad"])
def test_both_attention_kernels_give_the_same_decoding_step(grad, monkeypatch):
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 4).eval()
    cache, x = {}, torch.randn(3, 4, 16)
    outs = {}
    for keys in (0, 512):
        monkeypatch.setattr(layers, "matmul_attention_max_keys", lambda mode, head_dim, dtype, keys=keys: keys)
        with torch.set_grad_enabled(grad):
            cache = {}
            outs[keys] = torch.cat([attn(x[:, i : i + 1], cache=cache) for i in range(4)], 1)
    assert torch.allclose(outs[0], outs[512], atol=1e-6)


def test_cross_attention_with_grouped_memory_equals_repeated_memory():
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 4, cross=True).eval()
    memory, x = torch.randn(2, 5, 16), torch.randn(6, 1, 16)  # 3 beams for each of 2 sentences
    src = torch.tensor([[4, 5, 6, 0, 0], [4, 5, 6, 7, 8]])
    grouped = attn(x, create_padding_mask(src), memory=memory)
    repeated = attn(x, create_padding_mask(src).repeat_interleave(3, 0), memory=memory.repeat_interleave(3, 0))
    assert torch.allclose(grouped, repeated, atol=1e-6)


def additive(mask):
    """The ``nn.Transformer`` form of a bool mask: 0 where attending, -inf where masked."""
    return torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_a_float_additive_mask_equals_the_bool_mask_in_cpu_bf16_training(batch, cross, matmul_below):
    matmul_below(256)
    tokens, x = batch
    memory = torch.randn(3, 6, 16) if cross else None
    mask = create_padding_mask(tokens) if cross else create_combined_mask(tokens)  # with a fully masked row
    attn = MultiHeadAttention(16, 4, cross=cross).train()
    results = []
    for attn_mask in (mask, additive(mask)):
        attn.zero_grad()
        inputs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert use_matmul_attention(torch.zeros(1, dtype=torch.bfloat16), 6)  # the path that crashed
            out = attn(inputs, attn_mask, memory=memory)
        out.float().sum().backward()
        results.append((out, inputs.grad, [p.grad.clone() for p in attn.parameters()]))
    (out, grad, grads), (float_out, float_grad, float_grads) = results
    assert torch.isfinite(float_out).all() and torch.equal(float_out, out)
    assert torch.equal(float_grad, grad) and all(torch.equal(a, b) for a, b in zip(float_grads, grads))


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_a_float_additive_mask_equals_the_bool_mask_on_sdpa_and_in_attention_weights(batch, cross):
    tokens, x = batch
    memory = torch.randn(3, 6, 16) if cross else None
    mask = create_padding_mask(tokens) if cross else create_combined_mask(tokens)
    attn = MultiHeadAttention(16, 4, cross=cross).eval()
    weights = attn.attention_weights(x, additive(mask), memory)
    assert torch.equal(weights, attn.attention_weights(x, mask, memory))
    for dtype in (torch.float32, torch.bfloat16):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            expected, out = attn(x, mask, memory=memory), attn(x, additive(mask), memory=memory)
        assert torch.allclose(out.float(), expected.float(), atol=1e-6), dtype  # fully masked rows give zeros too


def test_matmul_attention_adds_finite_values_of_a_float_mask():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 4, 8) for _ in range(3))
    bias = torch.randn(2, 1, 4, 4)
    bias[0, 0, 1] = float("-inf")  # a query with no key
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=bias.double())
    expected[0, :, 1] = 0.0
    assert torch.allclose(matmul_attention(q, k, v, bias).double(), expected, atol=1e-5)
