import copy
import logging
from types import SimpleNamespace

import pytest
import sacrebleu
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.trainer.states import TrainerFn

from lightning_transformer.callbacks import metrics
from lightning_transformer.callbacks.metrics import TranslationMetrics
from lightning_transformer.data import TranslationDataModule
from lightning_transformer.data.batch import unpack_batch
from lightning_transformer.data.tokenizer import Tokenizer


def evaluate(model, data, callback, **kwargs):
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[callback], **kwargs)
    return trainer.validate(model, data, verbose=False)[0]


def test_corpus_bleu_equals_sacrebleu_on_the_same_outputs(small_run):
    _, model, data = small_run
    callback = TranslationMetrics(beam_size=2)
    logged = evaluate(model, data, callback)
    references = data.references("validation")
    assert callback.last_scores["sentences"] == len(references) == 30
    assert callback.last_references == references
    assert sum(bool(h) for h in callback.last_hypotheses) > 20  # real, non-empty translations
    expected_bleu = sacrebleu.corpus_bleu(callback.last_hypotheses, [references]).score
    expected_chrf = sacrebleu.corpus_chrf(callback.last_hypotheses, [references]).score
    assert logged["val/bleu"] == pytest.approx(expected_bleu, abs=1e-4)
    assert logged["val/chrf"] == pytest.approx(expected_chrf, abs=1e-4)


def test_fit_decodes_only_every_nth_validation(small_run, tmp_path):
    _, trained, data = small_run
    model = copy.deepcopy(trained)
    calls = []
    translate_ids = model.translate_ids
    model.translate_ids = lambda src, *args: calls.append(len(src)) or translate_ids(src, *args)
    callback = TranslationMetrics(beam_size=1, every_n_evaluations=2)
    Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, max_steps=6, val_check_interval=2, limit_val_batches=1,
            num_sanity_val_steps=0, callbacks=[callback]).fit(model, data)
    assert len(calls) == 1  # validations after steps 2, 4 and 6: only the second decodes
    assert "val/bleu" in evaluate(model, data, callback)  # a standalone validate always decodes


def test_two_ranks_score_every_sentence_exactly_once(small_run, monkeypatch):
    """Each simulated rank decodes its own shard; the gathered corpus holds every index once."""
    root, model, small_data = small_run
    data = TranslationDataModule(small_data.hparams.dataset, format="tsv", vocab_size=small_data.vocab_size,
                                 max_tokens=128, max_length=64, cache_dir=str(root / "cache"))
    data.setup("validate")
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(type(data), "_rank_and_world_size", lambda self, rank=rank: (rank, 2))
        callback = TranslationMetrics(beam_size=1)
        for batch in data.val_dataloader():
            callback._collect(_Trainer(data), model, batch)
        shards.append(callback._outputs)
    assert shards[0] and shards[1] and not shards[0].keys() & shards[1].keys()

    monkeypatch.setattr(metrics.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(metrics.dist, "get_world_size", lambda: 2)
    # Both ranks also report one sentence twice, as a padding distributed sampler would.
    duplicated = [shards[0] | {next(iter(shards[1])): shards[1][next(iter(shards[1]))]}, shards[1]]
    monkeypatch.setattr(metrics.dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), duplicated))
    merged = metrics.gather_unique(shards[0])
    assert sorted(merged) == list(range(len(data.references("validation"))))


class _Trainer:
    """What the callback reads of a Trainer inside a standalone validation run."""

    sanity_checking = False
    state = SimpleNamespace(fn=TrainerFn.VALIDATING)

    def __init__(self, datamodule):
        self.datamodule = datamodule


# References as zh/ja and many other corpora hold them: full-width punctuation, ellipses,
# superscripts, ligatures, the ideographic space, and a character the tokenizer never saw.
UNUSUAL_REFERENCES = ["你好，世界！", "本当に？\u3000はい……", "E = mc², la ﬁn.", "Ｆｕｌｌ ｗｉｄｔｈ！", "Café 🎉"]


@pytest.mark.parametrize("normalization", ["none", "nfkc"])
def test_a_perfect_system_scores_100_on_references_nfkc_would_change(normalization, caplog):
    """Hypotheses are the references through encode and decode, scored as validation scores them."""
    train_text = [ref.replace("🎉", "") for ref in UNUSUAL_REFERENCES] * 20  # the emoji stays unseen
    tokenizer = Tokenizer.train(train_text, vocab_size=400, normalization=normalization)
    data = SimpleNamespace(tokenizer=tokenizer, references=lambda split: UNUSUAL_REFERENCES)
    trainer = SimpleNamespace(datamodule=data, sanity_checking=False, state=SimpleNamespace(fn=TrainerFn.VALIDATING))
    encoded = [tokenizer.encode(ref) for ref in UNUSUAL_REFERENCES]
    module = _PerfectSystem(encoded)
    callback = TranslationMetrics(beam_size=1)
    with caplog.at_level(logging.INFO):
        callback._collect(trainer, module, {"src": torch.arange(5)[:, None], "index": torch.arange(5)})
        callback._score(trainer, module, "validation", "val")
    assert callback.last_scores["bleu"] == pytest.approx(100.0)
    assert callback.last_scores["chrf"] == pytest.approx(100.0)
    assert module.logged["val/bleu"].item() == pytest.approx(100.0)
    signature = next(record.getMessage() for record in caplog.records if "nrefs:1" in record.getMessage())
    # Normalised references make scores incomparable with raw-reference ones: the signature says so.
    assert ("refs:nfkc" in signature) == (normalization == "nfkc")


class _PerfectSystem:
    """A module whose "translation" of source ``[i]`` is reference ``i``'s token ids."""

    device = torch.device("cpu")
    unpack_batch = staticmethod(unpack_batch)  # the callback reads batches through the module's hook

    def __init__(self, encoded):
        self.encoded, self.logged = encoded, {}

    def translate_ids(self, src, *args):
        return [[SimpleNamespace(tokens=self.encoded[i])] for i in src[:, 0].tolist()]

    def log_dict(self, values, **kwargs):
        self.logged.update(values)
