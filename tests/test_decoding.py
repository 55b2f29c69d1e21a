import math

import pytest
import torch

from lightning_transformer import (
    Seq2SeqTransformer,
    beam_search,
    create_combined_mask,
    create_padding_mask,
    greedy_decode,
    length_penalty,
)
from lightning_transformer.cli.translate import main as translate_main
from lightning_transformer.cli.translate import translate
from lightning_transformer.generation.decoding import max_output_lengths, sampler

PAD, BOS, EOS, A, B = 0, 1, 2, 3, 4


class TableModel:
    """Next-token probabilities looked up from the decoded prefix: a model with known answers.

    Best sequences: "b" (0.4 * 0.9 = 0.36) beats "a b" (0.6 * 0.55 * 1 = 0.33), which greedy picks.
    """

    table = {
        (): {A: 0.6, B: 0.4},
        (A,): {EOS: 0.45, B: 0.55},
        (B,): {EOS: 0.9, A: 0.1},
        (A, B): {EOS: 1.0},
        (B, A): {EOS: 1.0},
    }

    def encode(self, src, src_mask):
        return torch.zeros(src.size(0), src.size(1), 1)

    def init_cache(self):
        return [{"self": {}, "cross": {}}]

    def decode(self, tgt, memory, tgt_mask, src_mask, cache):
        state = cache[0]["self"]
        state["prefix"] = torch.cat([state["prefix"], tgt], dim=1) if "prefix" in state else tgt
        logits = torch.full((tgt.size(0), 1, 5), -math.inf)
        for row, prefix in enumerate(state["prefix"][:, 1:].tolist()):
            for token, p in self.table.get(tuple(prefix), {EOS: 1.0}).items():
                logits[row, 0, token] = math.log(p)
        return logits


def tiny_model(**overrides):
    torch.manual_seed(0)
    return Seq2SeqTransformer(**{**dict(src_vocab_size=30, tgt_vocab_size=30, d_model=32, nhead=4, num_encoder_layers=2,
                                        num_decoder_layers=2, dim_feedforward=64), **overrides}).eval()


def test_length_penalty_formulas():
    assert length_penalty(7, 0.6) == pytest.approx(((5 + 7) / 6) ** 0.6)
    assert length_penalty(7, 0.6, "power") == pytest.approx(7**0.6)
    assert length_penalty(7, 0.0) == 1.0
    with pytest.raises(ValueError, match="gnmt"):
        length_penalty(3, 1.0, "linear")


def test_beam_search_finds_the_expected_hypotheses_and_scores():
    src = torch.tensor([[5, 6, 7]])
    (hyps,) = beam_search(TableModel(), src, beam_size=2, nbest=2, alpha=0.0, max_len_a=0, max_len_b=10)
    assert [h.tokens for h in hyps] == [[B], [A, B]]
    assert [h.log_prob for h in hyps] == pytest.approx([math.log(0.4 * 0.9), math.log(0.6 * 0.55)])
    assert [h.score for h in hyps] == pytest.approx([h.log_prob for h in hyps])
    assert greedy_decode(TableModel(), src, 10, PAD, BOS, EOS) == [[A, B]]


def test_length_penalty_changes_the_ranking_as_the_formula_says():
    src = torch.tensor([[5, 6, 7]])
    (hyps,) = beam_search(TableModel(), src, beam_size=2, nbest=2, alpha=1.0, max_len_a=0, max_len_b=10)
    short, long = math.log(0.36) / ((5 + 2) / 6), math.log(0.33) / ((5 + 3) / 6)  # L counts EOS
    assert long > short
    assert [h.tokens for h in hyps] == [[A, B], [B]]
    assert [h.score for h in hyps] == pytest.approx([long, short])


def test_length_limit_forces_eos():
    src = torch.tensor([[5, 6, 7]])
    # Two tokens at most, EOS included: "a b" is cut, "a" ends with P(EOS | a) = 0.45.
    (hyps,) = beam_search(TableModel(), src, beam_size=2, nbest=2, alpha=0.0, max_len_a=0, max_len_b=2)
    assert [h.tokens for h in hyps] == [[B], [A]]
    assert [h.log_prob for h in hyps] == pytest.approx([math.log(0.36), math.log(0.6 * 0.45)])
    assert greedy_decode(TableModel(), src, 2, PAD, BOS, EOS) == [[A]]


def test_cached_decoding_equals_full_decoding():
    model = tiny_model(norm_first=True)
    src = torch.randint(3, 30, (3, 7))
    src[1, 5:] = PAD
    tgt = torch.randint(3, 30, (3, 6))
    tgt[:, 0] = BOS
    src_mask = create_padding_mask(src)
    memory = model.encode(src, src_mask)
    full = model.decode(tgt, memory, create_combined_mask(tgt), src_mask)
    cache = model.init_cache()
    steps = [model.decode(tgt[:, t : t + 1], memory, None, src_mask, cache) for t in range(tgt.size(1))]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_beam_size_one_equals_greedy():
    model = tiny_model()
    src = torch.randint(3, 30, (5, 6))
    src[2, 3:] = PAD
    greedy = greedy_decode(model, src, 9, PAD, BOS, EOS)
    beam = beam_search(model, src, beam_size=1, alpha=0.0, max_len_a=0, max_len_b=9)
    assert [h[0].tokens for h in beam] == greedy


def test_a_batched_beam_search_equals_searching_each_sentence_alone():
    model = tiny_model()
    src = torch.randint(3, 30, (3, 7))
    src[0, 4:] = PAD
    src[2, 2:] = PAD
    batched = beam_search(model, src, beam_size=3, nbest=2, max_len_a=1.0, max_len_b=3)
    for row, hyps in zip(src, batched):
        alone = beam_search(model, row[: int((row != PAD).sum())][None], beam_size=3, nbest=2, max_len_a=1.0,
                            max_len_b=3)[0]
        assert [h.tokens for h in hyps] == [h.tokens for h in alone]
        assert [h.score for h in hyps] == pytest.approx([h.score for h in alone], abs=1e-4)


class RecordingTableModel(TableModel):
    """:class:`TableModel` noting the rows of every step: (hypotheses fed, encoder memory rows, source mask rows)."""

    def __init__(self):
        self.rows = []

    def decode(self, tgt, memory, tgt_mask, src_mask, cache):
        self.rows.append((tgt.size(0), memory.size(0), src_mask.size(0)))
        return super().decode(tgt, memory, tgt_mask, src_mask, cache)


def test_finished_sentences_leave_the_batch():
    model = RecordingTableModel()
    src = torch.tensor([[5, 6, PAD], [5, 6, 7]])  # limits 2 and 3 tokens
    batched = beam_search(model, src, beam_size=2, nbest=2, alpha=0.0, max_len_a=1.0, max_len_b=0)
    # Both beams of sentence 0 end at step 2 (at its limit: "b", then "a"); sentence 1 takes a third step alone.
    assert model.rows == [(4, 2, 2), (4, 2, 2), (2, 1, 1)]
    assert [h.tokens for h in batched[0]] == [[B], [A]]
    alone = beam_search(TableModel(), src[1:], beam_size=2, nbest=2, alpha=0.0, max_len_a=1.0, max_len_b=0)[0]
    assert [h.tokens for h in batched[1]] == [h.tokens for h in alone] == [[B], [A, B]]
    assert [h.score for h in batched[1]] == pytest.approx([h.score for h in alone])


def test_outputs_respect_the_per_sentence_limit():
    model = tiny_model()
    src = torch.randint(3, 30, (4, 8))
    src[0, 2:] = PAD  # two source tokens: limit 0.5 * 2 + 2 = 3
    results = beam_search(model, src, beam_size=3, nbest=3, max_len_a=0.5, max_len_b=2)
    limits = [int(0.5 * n + 2) for n in (src != PAD).sum(1).tolist()]
    for hyps, limit in zip(results, limits):
        assert len(hyps) == 3
        assert all(len(h.tokens) + 1 <= limit and EOS not in h.tokens and PAD not in h.tokens for h in hyps)
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)


def test_bad_beam_arguments_are_refused():
    with pytest.raises(ValueError, match="nbest"):
        beam_search(TableModel(), torch.tensor([[5]]), beam_size=2, nbest=3)


class NeverEnds(Seq2SeqTransformer):
    """A model whose EOS logit is far below every other, so only a length limit stops its decoding."""

    def project(self, states):
        logits = super().project(states)
        return logits - 1e4 * torch.nn.functional.one_hot(torch.tensor(EOS), logits.size(-1))


def never_ends(vocab=30, **overrides):
    torch.manual_seed(0)
    return NeverEnds(src_vocab_size=vocab, tgt_vocab_size=vocab, d_model=32, nhead=4, num_encoder_layers=1,
                     num_decoder_layers=1, dim_feedforward=64, max_len=8, **overrides).eval()


def test_a_model_that_never_emits_eos_decodes_up_to_its_positions():
    # a * S + b = 2 * 6 + 10 = 22 tokens would need 22 decoder positions; the model has 8.
    model = never_ends(max_decode_len_a=2.0, max_decode_len_b=10)
    src = torch.randint(3, 30, (2, 6))
    src[1, 4:] = PAD
    # BOS and 7 tokens fill the 8 positions; the 8th generated token, EOS, is never fed back.
    for hyps in model.translate_ids(src, beam_size=3):
        assert len(hyps[0].tokens) == 7
    greedy = greedy_decode(model, src, 22, PAD, BOS, EOS, max_positions=8)
    assert [len(tokens) for tokens in greedy] == [7, 7]
    beam = beam_search(model, src, beam_size=2, max_len_a=2.0, max_len_b=10, max_positions=8)
    assert [len(hyps[0].tokens) for hyps in beam] == [7, 7]


def test_the_clamp_is_exactly_the_positional_table():
    model = never_ends()
    src = torch.randint(3, 30, (2, 6))
    src[1, 2:] = PAD
    assert max_output_lengths(src, PAD, 2.0, 10, max_positions=8).tolist() == [8, 8]
    assert max_output_lengths(src, PAD, 0.5, 4, max_positions=8).tolist() == [7, 5]  # below the clamp: unchanged
    assert [len(t) for t in greedy_decode(model, src, 8, PAD, BOS, EOS)] == [7, 7]  # 8 positions: fits
    with pytest.raises(ValueError, match="exceeds the model's max_len=8"):  # one more would not
        greedy_decode(model, src, 9, PAD, BOS, EOS)


def tiny_tokenizer():
    from lightning_transformer.data.tokenizer import Tokenizer

    return Tokenizer.train(["the cat sat on the mat .", "where is the station ?"] * 10, vocab_size=300)


LONG = "the cat sat on the mat where is the station the cat sat on the mat ."


def test_over_long_input_to_translate_is_truncated_with_one_warning():
    tokenizer = tiny_tokenizer()
    model = never_ends(vocab=tokenizer.vocab_size, max_decode_len_a=2.0, max_decode_len_b=10)
    with pytest.warns(UserWarning, match=r"2 of 3 sentences .* max_len=8") as caught:
        outputs = translate(model, tokenizer, [LONG, "the cat .", LONG + " the mat"], beam_size=2)
    assert len(caught) == 1 and len(outputs) == 3


def test_translate_cli_reports_over_long_input_in_one_line(tmp_path, capsys):
    tokenizer = tiny_tokenizer()
    model = never_ends(vocab=tokenizer.vocab_size)
    checkpoint = tmp_path / "model.ckpt"
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict(),
                "TranslationDataModule": {"tokenizer": tokenizer.to_str()}}, checkpoint)
    source, target = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text(f"{LONG}\nthe cat .\n", encoding="utf-8")
    translate_main([str(checkpoint), "--input", str(source), "--output", str(target)])
    errors = [line for line in capsys.readouterr().err.splitlines() if "max_len" in line]
    assert errors == ["warning: 1 of 2 sentences are longer than the model's max_len=8 tokens (EOS included) and "
                      "were truncated to it; split them or use a model with a larger max_len."]
    assert len(target.read_text(encoding="utf-8").splitlines()) == 2


# ----- sampling through greedy_decode's next-token rule ------------------------------------------------------------
def test_sampling_draws_whole_translations_with_the_models_probabilities():
    src = torch.tensor([[5, 6, 7]]).expand(4000, -1)
    choose = sampler(generator=torch.Generator().manual_seed(0))
    drawn = greedy_decode(TableModel(), src, 10, PAD, BOS, EOS, choose=choose)
    frequencies = {seq: sum(tuple(d) == seq for d in drawn) / len(drawn) for seq in [(B,), (B, A), (A,), (A, B)]}
    expected = {(B,): 0.4 * 0.9, (B, A): 0.4 * 0.1, (A,): 0.6 * 0.45, (A, B): 0.6 * 0.55}
    assert frequencies == pytest.approx(expected, abs=0.03)  # 4000 draws: standard error below 0.008


class LovesSpecials(Seq2SeqTransformer):
    """A model whose padding and BOS logits dwarf every other, so only the decoder's masking keeps them out."""

    def project(self, states):
        logits = super().project(states)
        return logits + 1e4 * torch.nn.functional.one_hot(torch.tensor([PAD, BOS]), logits.size(-1)).sum(0)


def test_sampling_never_draws_padding_or_bos_and_keeps_each_sentences_limit():
    torch.manual_seed(0)
    model = LovesSpecials(src_vocab_size=30, tgt_vocab_size=30, d_model=32, nhead=4, num_encoder_layers=1,
                          num_decoder_layers=1, dim_feedforward=64).eval()
    src = torch.randint(3, 30, (6, 5))
    limits = torch.tensor([1, 2, 3, 4, 5, 6])
    for choose in (None, sampler(temperature=2.0, generator=torch.Generator().manual_seed(0))):
        decoded = greedy_decode(model, src, limits, PAD, BOS, EOS, choose=choose)
        assert all(PAD not in tokens and BOS not in tokens and EOS not in tokens for tokens in decoded)
        assert all(len(tokens) < limit for tokens, limit in zip(decoded, limits.tolist()))  # EOS fills the last


def test_seeded_sampling_reproduces_and_cold_or_top_1_sampling_is_greedy():
    model = tiny_model()
    src = torch.randint(3, 30, (8, 6))
    src[3, 2:] = PAD

    def draw(seed, **options):
        return greedy_decode(model, src, 9, PAD, BOS, EOS, choose=sampler(**options,
                                                                         generator=torch.Generator().manual_seed(seed)))

    assert draw(1) == draw(1) != draw(2)
    greedy = greedy_decode(model, src, 9, PAD, BOS, EOS)
    assert draw(1, temperature=1e-4) == draw(2, top_k=1) == draw(3, temperature=0.0) == greedy
