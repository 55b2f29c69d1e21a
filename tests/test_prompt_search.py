import itertools

import pytest
import torch

from lightning_transformer.generation.decoding import length_penalty
from lightning_transformer.generation.prompt_search import (
    beam_generate,
    prompt_beam_search,
)
from lightning_transformer.generation.sampling import generate
from lightning_transformer.nn.causal import CausalTransformer

PAD, BOS, EOS = 0, 1, 2


class Biased(CausalTransformer):
    """A tiny random language model that never predicts padding or BOS, its EOS logit shifted by ``eos_bias``."""

    def __init__(self, vocab: int = 20, max_len: int = 16, eos_bias: float = 0.0) -> None:
        super().__init__(vocab, 32, 4, 2, 64, dropout=0.0, max_len=max_len)
        self.eos_bias = eos_bias

    def forward(self, ids, mask=None, cache=None):
        logits = super().forward(ids, mask, cache)
        logits[..., EOS] += self.eos_bias
        logits[..., [PAD, BOS]] = -torch.inf
        return logits


def biased(seed: int = 0, **kwargs) -> Biased:
    torch.manual_seed(seed)
    return Biased(**kwargs).eval()


def continuation_log_prob(model, prompt: list[int], tokens: list[int]) -> float:
    """``log P(tokens, EOS | prompt)`` teacher-forced in one pass without a cache."""
    line = torch.tensor(prompt + tokens + [EOS])
    with torch.no_grad():
        log_probs = model(line[None, :-1])[0].double().log_softmax(-1)
    positions = torch.arange(len(prompt) - 1, len(line) - 1)
    return log_probs[positions, line[positions + 1]].sum().item()


def unpadded(row: list[int]) -> list[int]:
    return [t for t in row if t != PAD]


def test_beam_size_one_equals_greedy():
    model = biased(eos_bias=2.5)
    prompts = torch.tensor([[1, 5, 6, 7], [0, 0, 1, 9], [1, 8, 0, 0], [1, 3, 4, 0], [1, 0, 0, 0], [1, 11, 12, 13]])
    greedy = generate(model, prompts, 6, EOS, temperature=0).tolist()
    beam = beam_generate(model, prompts, 1, 6, BOS, EOS, alpha=0.6).tolist()
    ended = [EOS in unpadded(row) for row in greedy]
    assert any(ended) and not all(ended)  # both ways of stopping are covered
    for g, b, eos in zip(greedy, beam, ended):
        g, b = unpadded(g), unpadded(b)
        # Greedy is cut at max_new_tokens; beam search must end in EOS, so its last allowed token is EOS.
        assert b == g if eos else (b[:-1] == g[:-1] and b[-1] == EOS)


def test_a_wide_beam_is_exhaustive_and_scores_are_teacher_forced_log_probs_over_the_penalty():
    # 3 words and EOS, at most 3 new tokens: 1 + 3 + 9 = 13 continuations, all kept by 16 beams.
    model = biased(vocab=6, max_len=12).double()
    prompts = [[1, 3, 5, 4], [1, 4]]
    results = prompt_beam_search(model, torch.tensor([prompts[0], [0, 0, *prompts[1]]]), beam_size=16,
                                 max_new_tokens=3, bos_token_id=BOS, eos_token_id=EOS, alpha=0.6, nbest=13)
    for prompt, hyps in zip(prompts, results):
        every = [list(words) for n in range(3) for words in itertools.product((3, 4, 5), repeat=n)]
        expected = sorted(((continuation_log_prob(model, prompt, words) / length_penalty(len(words) + 1, 0.6), words)
                           for words in every), reverse=True)
        assert [h.tokens for h in hyps] == [words for _, words in expected]
        assert [h.score for h in hyps] == pytest.approx([score for score, _ in expected], rel=1e-12)
        assert [h.log_prob for h in hyps] == pytest.approx(
            [continuation_log_prob(model, prompt, h.tokens) for h in hyps], rel=1e-12)


def test_cached_beams_score_what_the_model_gives_their_tokens_without_a_cache():
    # Narrow beams over a larger vocabulary reorder the cache at every step.
    model = biased(seed=1, eos_bias=1.0).double()
    prompts = [[1, 5, 6, 7], [1, 9], [1, 8, 4], [1, 3]]
    padded = torch.stack([torch.tensor([*prompt, *[PAD] * (4 - len(prompt))]) for prompt in prompts])
    results = prompt_beam_search(model, padded, beam_size=3, max_new_tokens=6, bos_token_id=BOS, eos_token_id=EOS,
                                 alpha=1.0, nbest=3)
    for prompt, hyps in zip(prompts, results):
        assert len(hyps) == 3 and [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        for h in hyps:
            assert h.log_prob == pytest.approx(continuation_log_prob(model, prompt, h.tokens), rel=1e-12)
            assert h.score == pytest.approx(h.log_prob / length_penalty(len(h.tokens) + 1, 1.0), rel=1e-12)


@pytest.mark.parametrize("left", [True, False])
def test_a_prompt_gets_the_same_beams_whatever_its_padding_and_batch(left):
    model = biased(eos_bias=1.0)
    rows = [[1, 5, 6, 7], [1, 9], [1, 8, 4], [1, 3], [1]]
    padded = torch.tensor([([PAD] * (4 - len(row)) + row) if left else (row + [PAD] * (4 - len(row))) for row in rows])
    options = {"beam_size": 3, "max_new_tokens": 5, "bos_token_id": BOS, "eos_token_id": EOS, "nbest": 2}
    batched = prompt_beam_search(model, padded, **options)
    for row, hyps in zip(rows, batched):
        (alone,) = prompt_beam_search(model, torch.tensor([row]), **options)
        assert [h.tokens for h in hyps] == [h.tokens for h in alone]
        assert [h.score for h in hyps] == pytest.approx([h.score for h in alone], abs=1e-5)
    best = beam_generate(model, padded, 3, 5, BOS, EOS)
    expected = [row + hyps[0].tokens + [EOS] for row, hyps in zip(rows, batched)]
    assert [unpadded(row) for row in best.tolist()] == expected


def test_eos_max_new_tokens_and_max_len_limit_the_continuations():
    options = {"beam_size": 2, "bos_token_id": BOS, "eos_token_id": EOS, "nbest": 2}
    prompts = torch.tensor([[1, 5, 0, 0, 0, 0], [1, 3, 4, 5, 6, 7]])
    (ends_at_once, _) = prompt_beam_search(biased(eos_bias=100.0, max_len=8), prompts, max_new_tokens=5, **options)
    assert ends_at_once[0].tokens == [] and ends_at_once[0].log_prob == pytest.approx(0.0, abs=1e-6)
    never_ends = biased(eos_bias=-1e4, max_len=8)
    # Row 0 may add 5 tokens; row 1 only 2 (6 + 2 = max_len), the last of them EOS.
    short, long = prompt_beam_search(never_ends, prompts, max_new_tokens=5, **options)
    assert [len(h.tokens) for h in short] == [4, 4] and [len(h.tokens) for h in long] == [1, 1]
    assert all(EOS not in h.tokens for h in short + long)
    assert beam_generate(never_ends, prompts, 2, 5, BOS, EOS).size(1) == 8
    # No room: max_new_tokens=0, or a prompt of max_len tokens, gets no hypothesis and is returned as it is.
    full = torch.tensor([[1, 3, 4, 5, 6, 7, 8, 9], [0, 0, 0, 0, 0, 0, 1, 5]])
    assert prompt_beam_search(never_ends, full, max_new_tokens=3, **options)[0] == []
    assert beam_generate(never_ends, full, 2, 3, BOS, EOS)[0].tolist() == full[0].tolist()
    assert prompt_beam_search(never_ends, prompts, max_new_tokens=0, **options) == [[], []]
    assert torch.equal(beam_generate(never_ends, prompts, 2, 0, BOS, EOS), prompts)


def test_bad_requests_are_refused():
    model = biased(max_len=8)
    with pytest.raises(ValueError, match="nbest"):
        prompt_beam_search(model, torch.tensor([[1, 5]]), beam_size=2, nbest=3)
    with pytest.raises(ValueError, match="exceeds the model's max_len=8"):
        prompt_beam_search(model, torch.ones(1, 9, dtype=torch.long))
