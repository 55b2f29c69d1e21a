import math

import pytest
import torch

from lightning_transformer.generation.sampling import (
    filter_logits,
    generate,
    pack_prompts,
    sample_next,
    top_k_filter,
    top_p_filter,
)
from lightning_transformer.nn.causal import CausalTransformer

INF = math.inf
EOS = 2


def probs_logits(*probs):
    return torch.tensor(probs).log()


def test_top_k_filter_exact():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 0.0]])
    assert torch.equal(top_k_filter(logits, 2), torch.tensor([[-INF, 3.0, 2.0, -INF], [0.0, 0.0, 5.0, 0.0]]))
    assert torch.equal(top_k_filter(logits, 1), torch.tensor([[-INF, 3.0, -INF, -INF], [-INF, -INF, 5.0, -INF]]))
    assert torch.equal(top_k_filter(logits, 10), logits)
    with pytest.raises(ValueError, match="top_k=0 keeps no token"):
        top_k_filter(logits, 0)


def test_top_p_filter_keeps_smallest_set_reaching_p():
    logits = probs_logits(0.1, 0.5, 0.15, 0.25)

    def kept(p):
        return top_p_filter(logits, p).isfinite().tolist()

    assert kept(0.5) == [False, True, False, False]  # 0.5 alone reaches 0.5
    assert kept(0.51) == [False, True, False, True]  # 0.5 + 0.25
    assert kept(0.75) == [False, True, False, True]
    assert kept(0.76) == [False, True, True, True]
    assert kept(0.01) == [False, True, False, False]  # always at least the most likely token
    assert kept(1.0) == [True] * 4
    assert top_p_filter(logits, 0.6)[1] == logits[1]  # kept logits are unchanged
    with pytest.raises(ValueError, match="top_p=0 is outside"):
        top_p_filter(logits, 0)


def test_temperature_to_zero_is_greedy():
    torch.manual_seed(0)
    logits = torch.randn(64, 30)
    greedy = sample_next(logits, temperature=0)
    assert torch.equal(greedy, logits.argmax(-1))
    cold = sample_next(logits, temperature=1e-4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cold, greedy)
    with pytest.raises(ValueError, match="temperature=-1"):
        filter_logits(logits, temperature=-1)


def test_sampling_frequencies_match_filtered_softmax():
    logits = probs_logits(0.05, 0.4, 0.1, 0.3, 0.15)
    expected = filter_logits(logits, temperature=0.8, top_k=4, top_p=0.8).softmax(-1)
    assert expected[0] == 0 and expected[2] == 0  # top-k drops 0.05; top-p drops 0.1 (0.4+0.3+0.15 >= 0.8)
    draws = sample_next(logits.expand(20000, -1), 0.8, 4, 0.8, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(draws, minlength=5).float() / len(draws)
    torch.testing.assert_close(frequencies, expected, atol=0.015, rtol=0)


def test_pack_prompts_moves_padding_right():
    packed, lengths = pack_prompts(torch.tensor([[0, 0, 5, 6], [7, 8, 9, 0]]), 0)
    assert packed.tolist() == [[5, 6, 0, 0], [7, 8, 9, 0]] and lengths.tolist() == [2, 3]
    with pytest.raises(ValueError, match="prompt row 1 is all padding"):
        pack_prompts(torch.tensor([[1, 2], [0, 0]]), 0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CausalTransformer(30, 32, 4, 2, 64, dropout=0.0, max_len=12).eval()


@pytest.mark.parametrize("options", [{"temperature": 0}, {"temperature": 1.0, "top_k": 5, "top_p": 0.9}])
def test_cached_generation_equals_uncached(model, options):
    prompts = torch.tensor([[1, 5, 6, 7], [0, 0, 1, 9], [1, 8, 0, 0]])
    runs = [generate(model, prompts, 6, EOS, generator=torch.Generator().manual_seed(3), use_cache=cache, **options)
            for cache in (True, False)]
    assert torch.equal(*runs)
    assert runs[0][0, :4].tolist() == [1, 5, 6, 7] and runs[0][1, :2].tolist() == [1, 9]
    assert runs[0].size(1) > 4


@pytest.mark.parametrize("left", [True, False])
def test_batched_rows_equal_rows_alone_whatever_the_padding(model, left):
    rows = [torch.tensor([1, 5, 6, 7]), torch.tensor([1, 9]), torch.tensor([1, 8, 4])]
    padded = [torch.cat([row.new_zeros(4 - len(row)), row][:: 1 if left else -1]) for row in rows]
    batch = generate(model, torch.stack(padded), 5, EOS, temperature=0)
    for i, row in enumerate(rows):
        alone = generate(model, row[None], 5, EOS, temperature=0)[0]
        assert batch[i, : len(alone)].tolist() == alone.tolist()
        assert torch.all(batch[i, len(alone):] == 0)


def test_stops_at_eos_and_clamps_to_max_len():
    torch.manual_seed(0)
    model = CausalTransformer(30, 16, 2, 1, 32, dropout=0.0, max_len=12).eval()
    assert generate(_AlwaysEos(model), torch.tensor([[1, 5], [1, 0]]), 8, EOS).tolist() == [[1, 5, EOS], [1, EOS, 0]]
    long = generate(model, torch.tensor([[1, 5, 6], [1, 0, 0]]), 100, eos_token_id=-1, temperature=0)
    assert long.shape == (2, 12)
    assert generate(model, torch.tensor([[1, 5, 6], [1, 0, 0]]), 0, EOS).tolist() == [[1, 5, 6], [1, 0, 0]]
    with pytest.raises(ValueError, match="exceeds the model's max_len=12"):
        generate(model, torch.ones(1, 13, dtype=torch.long), 1, EOS)
    with pytest.raises(ValueError, match="max_new_tokens=-1"):
        generate(model, torch.ones(1, 3, dtype=torch.long), -1, EOS)


class _AlwaysEos(torch.nn.Module):
    """Wraps a model, making EOS the most likely next token everywhere."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.pad_token_id, self.max_len = inner, inner.pad_token_id, inner.max_len

    def init_cache(self):
        return self.inner.init_cache()

    def forward(self, ids, cache=None):
        logits = self.inner(ids, cache=cache)
        return logits.index_fill(-1, torch.tensor([EOS]), 100.0)
