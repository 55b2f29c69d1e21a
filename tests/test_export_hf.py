"""The Hugging Face Marian export computes what the project's model computes: logits, decoding, tokenizer."""

import json
import sys

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

transformers = pytest.importorskip("transformers")

from lightning_transformer import Seq2SeqTransformer
from lightning_transformer.cli.translate import load_translator
from lightning_transformer.export.hf import export_hf
from lightning_transformer.generation.decoding import beam_search, greedy_decode

MAX_NEW_TOKENS = 24  # one limit for every sentence: HF has no per-sentence a * S + b rule
MAX_LENGTH = MAX_NEW_TOKENS + 1  # HF's max_length counts the decoder start token


@pytest.fixture(scope="module")
def exported(small_run, small_corpus, tmp_path_factory):
    """(our model, our tokenizer, HF model, HF tokenizer, export folder, validation pairs) of small_run's
    last checkpoint."""
    model, tokenizer = load_translator(small_run[0] / "checkpoints" / "last.ckpt")
    folder = export_hf(model, tokenizer, tmp_path_factory.mktemp("hf") / "marian")
    hf_model = transformers.MarianMTModel.from_pretrained(folder, local_files_only=True).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    lines = (small_corpus / "validation.tsv").read_text(encoding="utf-8").splitlines()[1:]
    pairs = [line.split("\t")[:2] for line in lines]
    return model, tokenizer, hf_model, hf_tokenizer, folder, pairs


def padded(rows: list[list[int]]) -> torch.Tensor:
    return pad_sequence([torch.tensor(row) for row in rows], batch_first=True, padding_value=0)


def tokens_of(generated: torch.Tensor) -> list[list[int]]:
    """HF ``generate`` rows (start token first) as token lists without EOS and padding."""
    rows = [row[1:] for row in generated.tolist()]
    return [row[: row.index(2)] if 2 in row else [t for t in row if t != 0] for row in rows]


def test_folder_loads_offline_with_the_models_settings(exported):
    model, _, hf_model, hf_tokenizer, folder, _ = exported
    assert {p.name for p in folder.iterdir()} >= {"config.json", "generation_config.json", "model.safetensors",
                                                   "tokenizer.json", "tokenizer_config.json"}
    config, hp = hf_model.config, model.hparams
    assert (config.d_model, config.encoder_layers, config.decoder_attention_heads, config.decoder_ffn_dim) == (
        hp.d_model, hp.num_encoder_layers, hp.nhead, hp.dim_feedforward)
    assert config.activation_function == "relu" and config.scale_embedding and config.vocab_size == hp.tgt_vocab_size
    assert (config.pad_token_id, config.decoder_start_token_id, config.eos_token_id) == (0, 1, 2)
    assert config.share_encoder_decoder_embeddings and config.tie_word_embeddings
    generation = hf_model.generation_config
    assert generation.num_beams == hp.beam_size and generation.length_penalty == hp.length_penalty
    assert generation.suppress_tokens == [0, 1] and generation.max_length == hp.max_len + 1
    assert type(hf_tokenizer).__name__ in ("TokenizersBackend", "PreTrainedTokenizerFast")


def test_teacher_forced_logits_match_on_a_padded_batch(exported):
    model, tokenizer, hf_model, _, _, pairs = exported
    src = padded([tokenizer.encode(s) + [2] for s, _ in pairs[:8]])
    tgt = padded([[1] + tokenizer.encode(t) for _, t in pairs[:8]])
    assert (src == 0).any() and (tgt == 0).any()
    with torch.no_grad():
        ours = model(src, tgt)
        theirs = hf_model(input_ids=src, attention_mask=src.ne(0), decoder_input_ids=tgt,
                          decoder_attention_mask=tgt.ne(0)).logits
    difference = (ours - theirs)[tgt.ne(0)].abs().max().item()
    print(f"max |logit difference| = {difference:.2e}")
    assert difference < 1e-4


def test_greedy_generation_matches_greedy_decode(exported):
    model, tokenizer, hf_model, _, _, pairs = exported
    src = padded([tokenizer.encode(s) + [2] for s, _ in pairs])
    ours = greedy_decode(model, src, MAX_NEW_TOKENS, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.no_grad():
        theirs = hf_model.generate(input_ids=src, attention_mask=src.ne(0), num_beams=1, do_sample=False,
                                   max_length=MAX_LENGTH)
    assert tokens_of(theirs) == ours


def test_beam_search_agrees_with_the_power_length_penalty(exported):
    model, tokenizer, hf_model, _, _, pairs = exported
    src = padded([tokenizer.encode(s) + [2] for s, _ in pairs])
    alpha = model.hparams.length_penalty
    with torch.no_grad():
        theirs = tokens_of(hf_model.generate(input_ids=src, attention_mask=src.ne(0), num_beams=4,
                                             length_penalty=alpha, early_stopping=True, max_length=MAX_LENGTH))
    rates = {}
    for style in ("power", "gnmt"):
        searched = beam_search(model, src, beam_size=4, max_len_a=0.0, max_len_b=MAX_NEW_TOKENS, alpha=alpha,
                               penalty_style=style)
        ours = [hyps[0].tokens for hyps in searched]
        rates[style] = sum(a == b for a, b in zip(ours, theirs)) / len(ours)
    print(f"beam-4 agreement over {len(src)} sentences (alpha={alpha}): {rates}")
    assert rates["power"] >= 0.9


def test_tokenizer_round_trip_equals_ours(exported):
    _, tokenizer, _, hf_tokenizer, _, pairs = exported
    texts = ["Ça coûte 5 € à l'hôtel, señor!", "Naïve façade — 日本語 ☃ 🦜", "  two  spaces . 's", pairs[0][0]]
    for text in texts:
        ids = hf_tokenizer(text)["input_ids"]
        assert ids == tokenizer.encode(text) + [2]
        assert hf_tokenizer.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids) == text
    batch = hf_tokenizer(texts, padding=True, return_tensors="pt")
    assert hf_tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True) == texts


def test_translation_pipeline(exported):
    from transformers.pipelines import get_supported_tasks

    if "translation" not in get_supported_tasks():
        pytest.skip(f"transformers {transformers.__version__} removed the translation pipeline; use generate")
    _, _, hf_model, hf_tokenizer, folder, pairs = exported
    translator = transformers.pipeline("translation", model=str(folder))
    inputs = hf_tokenizer(pairs[0][0], return_tensors="pt")
    expected = hf_tokenizer.decode(hf_model.generate(**inputs)[0], skip_special_tokens=True)
    assert translator(pairs[0][0])[0]["translation_text"] == expected


def tiny_model(**overrides) -> Seq2SeqTransformer:
    settings = {"src_vocab_size": 300, "tgt_vocab_size": 300, "d_model": 16, "nhead": 2, "num_encoder_layers": 1,
                "num_decoder_layers": 2, "dim_feedforward": 32, "max_len": 32}
    torch.manual_seed(0)
    model = Seq2SeqTransformer(**settings | overrides).eval()
    with torch.no_grad():  # non-zero biases and LayerNorms, so a wrong permutation shows
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


@pytest.mark.parametrize("share, tie", [(True, False), (False, True), (False, False)])
def test_every_embedding_layout_maps_exactly(exported, tmp_path, share, tie):
    tokenizer = exported[1]
    model = tiny_model(share_embeddings=share, tie_output_embeddings=tie, tgt_vocab_size=300 if share else 310)
    hf_model = transformers.MarianMTModel.from_pretrained(export_hf(model, tokenizer, tmp_path / "out")).eval()
    assert (hf_model.config.share_encoder_decoder_embeddings, hf_model.config.tie_word_embeddings) == (share, tie)
    src, tgt = torch.tensor([[5, 6, 7, 2], [8, 2, 0, 0]]), torch.tensor([[1, 9, 10], [1, 0, 0]])
    with torch.no_grad():
        theirs = hf_model(input_ids=src, attention_mask=src.ne(0), decoder_input_ids=tgt,
                          decoder_attention_mask=tgt.ne(0)).logits
        assert (model(src, tgt) - theirs)[tgt.ne(0)].abs().max() < 1e-5


def test_existing_output_folder_is_refused_and_untouched(exported, tmp_path):
    _, tokenizer = exported[:2]
    (tmp_path / "config.json").write_text("keep")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        export_hf(tiny_model(), tokenizer, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"] and (tmp_path / "config.json").read_text() == "keep"


def test_models_marian_cannot_express_are_refused(exported, tmp_path):
    tokenizer = exported[1]
    with pytest.raises(ValueError, match="pre-norm .*post-norm only"):
        export_hf(tiny_model(norm_first=True), tokenizer, tmp_path / "pre_norm")

    class Sharpened(Seq2SeqTransformer):
        def project(self, states):
            return super().project(states) * 2

    with pytest.raises(ValueError, match=r"Sharpened overrides \['project'\]"):
        export_hf(Sharpened(**tiny_model().hparams), tokenizer, tmp_path / "subclass")
    assert not any(tmp_path.iterdir())


def test_missing_transformers_names_the_extra(exported, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install lightning-transformer\[hf\]"):
        export_hf(tiny_model(), exported[1], tmp_path / "out")


def test_tokenizer_config_suits_transformers_4_and_5(exported):
    config = json.loads((exported[4] / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["clean_up_tokenization_spaces"] is False
    assert set(exported[3]("Hi.")) == {"input_ids", "attention_mask"}  # token_type_ids would break generate(**inputs)
