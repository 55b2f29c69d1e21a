import re
import time
import warnings

import pandas as pd
import pytest
from conftest import TINY_MODEL
from copy_task import CopyTaskDataModule
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import CSVLogger

from lightning_transformer import Seq2SeqTransformer
from lightning_transformer.callbacks import RunCutShort, RunWillBeCutShort


class SlowSteps(Callback):
    """Makes every step take a while, so that a one-second max_time ends the run after a few steps."""

    def on_train_batch_end(self, *args):
        time.sleep(0.2)


def fit(tmp_path, **trainer_flags):
    model = Seq2SeqTransformer(**{**TINY_MODEL, "src_vocab_size": 20, "tgt_vocab_size": 20})
    trainer = Trainer(default_root_dir=tmp_path, logger=CSVLogger(tmp_path), enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                      log_every_n_steps=1, **trainer_flags)
    trainer.fit(model, CopyTaskDataModule())
    return trainer, pd.read_csv(next(tmp_path.rglob("metrics.csv")))


def test_a_run_cut_short_by_max_time_warns_and_logs_how_far_it_got(tmp_path):
    with pytest.warns(RunCutShort, match=r"of the 1000 scheduled .* trainer.max_time ran out") as caught:
        trainer, metrics = fit(tmp_path, max_steps=1000, max_time={"seconds": 1}, callbacks=[SlowSteps()])
    assert 0 < trainer.global_step < 1000
    [message] = [str(w.message) for w in caught if w.category is RunCutShort]
    assert f"optimizer step {trainer.global_step} of" in message
    done = metrics["train/schedule_done"].dropna()
    assert list(done) == [trainer.global_step / 1000]


def test_a_run_that_max_time_will_cut_warns_after_its_first_epoch_where_it_will_stop(tmp_path):
    # 4 steps an epoch of at least 0.2 s each: 40 steps need 8 s, and max_time allows 3.
    with pytest.warns(RunCutShort) as caught:
        trainer, _ = fit(tmp_path, max_epochs=10, max_time={"seconds": 3}, callbacks=[SlowSteps()])
    [forecast] = [str(w.message) for w in caught if w.category is RunWillBeCutShort]
    [stop] = [str(w.message) for w in caught if w.category is RunCutShort]
    categories = [w.category for w in caught]
    assert categories.index(RunWillBeCutShort) < categories.index(RunCutShort)
    reached = int(re.search(r"stop this run near step (\d+) of the 40 scheduled", forecast).group(1))
    assert 4 < reached < 40 and "36 steps need about" in forecast
    assert abs(reached - trainer.global_step) <= 5  # where it stopped, give or take the steps' jitter
    assert f"optimizer step {trainer.global_step} of the 40" in stop


def test_a_run_cut_short_by_epochs_counts_steps_of_its_epochs(tmp_path):
    with pytest.warns(RunCutShort, match=r"of the 40 scheduled"):  # 64 pairs / 16 a batch x 10 epochs
        fit(tmp_path, max_epochs=10, max_time={"seconds": 1}, callbacks=[SlowSteps()])


@pytest.mark.parametrize("schedule", [{"max_steps": 6}, {"max_epochs": 2}], ids=["steps", "epochs"])
def test_a_run_that_finishes_its_schedule_is_silent_and_logs_1(tmp_path, schedule):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RunCutShort)
        trainer, metrics = fit(tmp_path, **schedule)
    assert list(metrics["train/schedule_done"].dropna()) == [1.0]
