import unicodedata

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from lightning_transformer.data.tokenizer import Tokenizer

SENTENCES = [
    "The cat sat on the mat.",
    "El gato se sentó en la alfombra.",
    "¿Dónde está la estación de tren?",
    "Where is the train station?",
    "I don't know what you're talking about.",
    "No sé de qué estás hablando.",
    "Tom and Mary are married.",
    "Tom y María están casados.",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(SENTENCES, vocab_size=300)


def test_special_tokens_have_fixed_ids(tokenizer):
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2, 3)
    assert [tokenizer.decode([i], skip_special_tokens=False) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]


def test_vocabulary_never_exceeds_the_requested_size(tokenizer):
    assert 4 < tokenizer.vocab_size <= 300


def test_decode_inverts_encode(tokenizer):
    for sentence in set(SENTENCES):
        ids = tokenizer.encode(sentence)
        assert all(i > 3 for i in ids)
        assert tokenizer.decode(ids) == sentence


def test_decode_drops_special_tokens_unless_asked(tokenizer):
    ids = [tokenizer.bos_id, *tokenizer.encode("Tom y María"), tokenizer.eos_id, tokenizer.pad_id]
    assert tokenizer.decode(ids) == "Tom y María"
    assert "</s>" in tokenizer.decode(ids, skip_special_tokens=False)


def test_batch_methods_match_single_calls(tokenizer):
    batch = tokenizer.encode_batch(SENTENCES[:8])
    assert batch == [tokenizer.encode(s) for s in SENTENCES[:8]]
    assert tokenizer.decode_batch(batch) == SENTENCES[:8]


def test_save_load_and_json_string_round_trip(tokenizer, tmp_path):
    path = tmp_path / "nested" / "tokenizer.json"
    tokenizer.save(path)
    for restored in (Tokenizer.load(path), Tokenizer.from_str(tokenizer.to_str())):
        assert restored == tokenizer
        assert restored.encode(SENTENCES[2]) == tokenizer.encode(SENTENCES[2])


def test_missing_file_error_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="No tokenizer file at .*missing.json"):
        Tokenizer.load(tmp_path / "missing.json")


def test_invalid_json_is_a_clear_error():
    with pytest.raises(ValueError, match="Could not parse the tokenizer JSON"):
        Tokenizer.from_str("{not json")


def test_special_tokens_in_other_positions_are_rejected():
    foreign = HFTokenizer(models.BPE(vocab={"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}, merges=[]))
    with pytest.raises(ValueError, match="maps '<pad>' to id 1, expected 0"):
        Tokenizer(foreign)


def test_too_small_vocabulary_is_rejected():
    with pytest.raises(ValueError, match="vocab_size=4 leaves no room"):
        Tokenizer.train(SENTENCES, vocab_size=4)


# Text a lossless tokenizer must give back unchanged: what NFKC would rewrite (full-width forms,
# ellipses, superscripts, ligatures, the ideographic space U+3000), scripts and symbols absent from
# the training text, and spaces in every position.
UNUSUAL = [
    "你好，世界！这是测试。对吗？",
    "本当に？\u3000はい……",
    "E = mc² and the ﬁnal ﬂight",
    "Ｆｕｌｌ－ｗｉｄｔｈ １２３",
    "Crème brûlée, naïve café, Ångström",
    "e\u0301 stays decomposed",
    "Emoji 🎉👍🏽 and ✓ checks",
    "ʻŌlelo Hawaiʻi, Ελληνικά, עברית, ไทย",
    "  leading, double  and trailing spaces ",
    "a literal ▁ and <0x41> stay text",
]


def test_decode_inverts_encode_on_text_nfkc_would_change_and_characters_never_seen(tokenizer):
    for text in UNUSUAL:
        ids = tokenizer.encode(text)
        assert tokenizer.unk_id not in ids, text
        assert tokenizer.decode(ids) == text
    assert tokenizer.decode_batch(tokenizer.encode_batch(UNUSUAL)) == UNUSUAL
    assert tokenizer.normalization == "none" and tokenizer.normalize(UNUSUAL[0]) == UNUSUAL[0]


def test_nfkc_normalization_is_an_option():
    nfkc = Tokenizer.train(SENTENCES, vocab_size=300, normalization="nfkc")
    assert nfkc.normalization == "nfkc"
    for text in UNUSUAL:
        expected = unicodedata.normalize("NFKC", text)
        assert nfkc.decode(nfkc.encode(text)) == nfkc.normalize(text) == expected
    assert Tokenizer.from_str(nfkc.to_str()).normalization == "nfkc"


def test_unknown_normalization_is_rejected():
    with pytest.raises(ValueError, match="normalization='nfc' is not supported; use 'none'.*or 'nfkc'"):
        Tokenizer.train(SENTENCES, vocab_size=300, normalization="nfc")


def test_bpe_dropout_segments_each_encoding_anew_and_still_decodes_exactly(tokenizer):
    sentence = "Where is the train station?"
    plain = tokenizer.encode(sentence)
    dropped = tokenizer.with_dropout(0.3)
    segmentations = {tuple(dropped.encode(sentence)) for _ in range(50)}
    assert len(segmentations) > 1
    assert all(dropped.decode(ids) == sentence for ids in segmentations)
    assert min(map(len, segmentations)) >= len(plain) and max(map(len, segmentations)) > len(plain)
    assert tokenizer.encode(sentence) == plain and tokenizer.with_dropout(0.0).encode(sentence) == plain
    with pytest.raises(ValueError, match=r"BPE-dropout must be in \[0, 1\)"):
        tokenizer.with_dropout(1.0)
