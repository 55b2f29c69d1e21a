import pytest
import sacrebleu
from lightning.pytorch import Trainer

from lightning_transformer import metrics
from lightning_transformer.data import TranslationDataModule
from lightning_transformer.metrics import TranslationMetrics


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


def test_decodes_only_every_nth_validation(small_run):
    _, model, data = small_run
    callback = TranslationMetrics(beam_size=1, every_n_evaluations=2)
    assert "val/bleu" not in evaluate(model, data, callback)
    assert "val/bleu" in evaluate(model, data, callback)
    assert "val/bleu" not in evaluate(model, data, callback)


def test_two_ranks_score_every_sentence_exactly_once(small_run, monkeypatch):
    """Each simulated rank decodes its own shard; the gathered corpus holds every index once."""
    root, model, small_data = small_run
    data = TranslationDataModule(small_data.hparams.dataset, format="tsv", vocab_size=300, max_tokens=128,
                                 max_length=64, cache_dir=str(root / "cache"))
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
    sanity_checking = False
    testing = False

    def __init__(self, datamodule):
        self.datamodule = datamodule
