import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from lightning_transformer.tokenizer import Tokenizer

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
