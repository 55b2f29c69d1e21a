"""Checkpoints: opening one runs no foreign code, resuming is exact, and a killed run loses at most one interval."""

import csv
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import fsspec.implementations.local
import pytest
import torch
import yaml
from conftest import TINY_MODEL, fit_small
from copy_task import CopyTaskDataModule
from lightning.pytorch import Callback, Trainer

from lightning_transformer import Seq2SeqTransformer
from lightning_transformer.callbacks import ResumeRandomState
from lightning_transformer.checkpoint import UnsafeCheckpointError, load_checkpoint
from lightning_transformer.cli import main
from lightning_transformer.cli.average import average_checkpoints
from lightning_transformer.cli.translate import load_translator
from lightning_transformer.data.tokenizer import Tokenizer


class RunsCode:
    """Unpickles to a call of ``os.system``: what a hostile checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def hostile_checkpoint(small_run, tmp_path):
    """A real checkpoint with one extra entry whose unpickling would create ``marker``."""
    marker = tmp_path / "code-ran"
    checkpoint = torch.load(small_run[0] / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["callbacks"]["Innocent"] = RunsCode(marker)
    path = tmp_path / "hostile.ckpt"
    torch.save(checkpoint, path)
    return path, marker


def test_a_checkpoint_whose_pickle_runs_code_is_refused_everywhere(hostile_checkpoint, tmp_path, capsys, monkeypatch):
    path, marker = hostile_checkpoint
    for load in (load_checkpoint, load_translator, lambda p: average_checkpoints([p])):
        with pytest.raises(UnsafeCheckpointError, match=r"could run code.*asks for posix\.system"):
            load(path)
    monkeypatch.setattr(sys, "argv", ["lightning-transformer"])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(Path(__file__).parents[1] / "configs/demo.yaml"), "--ckpt_path", str(path)])
    assert exit_info.value.code == 2 and "could run code" in capsys.readouterr().err
    # Library use goes through Lightning and torch, which load tensors only by default too.
    with pytest.raises(pickle.UnpicklingError):
        Seq2SeqTransformer.load_from_checkpoint(path)
    with pytest.raises(pickle.UnpicklingError):
        Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, max_steps=1).fit(
            Seq2SeqTransformer(**{**TINY_MODEL, "src_vocab_size": 300, "tgt_vocab_size": 300}),
            CopyTaskDataModule(), ckpt_path=path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: an unrestricted load does run it
    assert marker.exists()


def test_every_checkpoint_the_project_writes_loads_as_tensors_and_plain_values(small_run, demo_run):
    paths = [*small_run[0].rglob("*.ckpt"), *demo_run.rglob("*.ckpt")]
    assert len(paths) >= 5
    for path in paths:
        checkpoint = load_checkpoint(path)
        assert {"state_dict", "optimizer_states", "rng_states"} <= checkpoint.keys()


def test_configs_and_tokenizer_files_run_no_code(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "code-ran"
    config = tmp_path / "hostile.yaml"
    config.write_text(f"seed_everything: !!python/object/apply:os.system ['touch {marker}']\n")
    monkeypatch.setattr(sys, "argv", ["lightning-transformer"])
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config)])
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(ValueError, match="Could not parse the tokenizer JSON"):
        Tokenizer.load(tokenizer)
    assert not marker.exists()


def test_truncated_or_missing_ckpt_path_is_refused_before_training(small_run, tmp_path, capsys, monkeypatch):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes((small_run[0] / "checkpoints" / "last.ckpt").read_bytes()[:10_000])
    monkeypatch.setattr(sys, "argv", ["lightning-transformer"])
    for path, message in ((truncated, "could not be read.*truncated"), (tmp_path / "none.ckpt", "does not exist")):
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(Path(__file__).parents[1] / "configs/demo.yaml"), "--ckpt_path", str(path)])
        assert exit_info.value.code == 2
        assert re.search(message, capsys.readouterr().err)
    assert truncated.stat().st_size == 10_000  # the bad file is left as it was


# ----- exact resume -------------------------------------------------------------------------------
class Record(Callback):
    """Each step's lr, loss and batch (by the pairs' indices)."""

    def __init__(self):
        self.lrs, self.losses, self.batches = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.losses.append(trainer.callback_metrics["train/loss"].item())
        self.batches.append(batch["index"].tolist())


def fit_recorded(corpus, root, max_steps, **kwargs):
    record = Record()
    _, data = fit_small(corpus, root, max_steps, record, **kwargs)
    return record, data


def test_resuming_mid_epoch_replays_the_same_batches_lrs_and_losses_with_dropout(small_corpus, tmp_path, monkeypatch):
    full, data = fit_recorded(small_corpus, tmp_path / "full", max_steps=30)
    steps_per_epoch = len(data.train_dataloader())
    stop = steps_per_epoch // 2
    assert 0 < stop < steps_per_epoch < 30  # stopped mid-epoch; the resumed part crosses an epoch boundary
    fit_recorded(small_corpus, tmp_path / "first", max_steps=stop, every_n_steps=stop)
    checkpoint = next((tmp_path / "first").glob(f"*step={stop}.ckpt"))
    resumed, _ = fit_recorded(small_corpus, tmp_path / "resumed", max_steps=30, ckpt_path=checkpoint)
    assert resumed.batches == full.batches[stop:]
    assert resumed.lrs == full.lrs[stop:]
    assert resumed.losses == full.losses[stop:]  # bitwise: same weights, optimizer state and dropout masks
    # Without the saved random state dropout draws other masks and the curve drifts.
    monkeypatch.setattr(Seq2SeqTransformer, "configure_callbacks", lambda self: [])
    drifted, _ = fit_recorded(small_corpus, tmp_path / "drifted", max_steps=30, ckpt_path=checkpoint)
    assert drifted.batches == full.batches[stop:] and drifted.losses != full.losses[stop:]


def test_an_interrupted_checkpoint_write_leaves_the_previous_file_whole(small_run, tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    target.write_bytes((small_run[0] / "checkpoints" / "last.ckpt").read_bytes())
    before = target.read_bytes()

    def die_before_rename(self):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(fsspec.implementations.local.LocalFileOpener, "commit", die_before_rename)
    trainer = Trainer(default_root_dir=tmp_path / "run", logger=False, enable_progress_bar=False, max_steps=1,
                      enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(Seq2SeqTransformer(**{**TINY_MODEL, "src_vocab_size": 20, "tgt_vocab_size": 20}), CopyTaskDataModule())
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["last.ckpt"]


def test_a_second_run_in_the_same_folder_overwrites_no_checkpoint(tmp_path):
    def fit():
        model = Seq2SeqTransformer(**{**TINY_MODEL, "src_vocab_size": 20, "tgt_vocab_size": 20, "warmup_steps": 1})
        Trainer(default_root_dir=tmp_path, max_steps=2, enable_progress_bar=False, enable_model_summary=False,
                limit_val_batches=0).fit(model, CopyTaskDataModule())

    fit()
    first = {path: path.read_bytes() for path in tmp_path.rglob("*.ckpt")}
    fit()
    assert first and all(path.read_bytes() == content for path, content in first.items())
    assert len(list(tmp_path.rglob("*.ckpt"))) == 2 * len(first)  # the second run wrote beside, in a new version


# ----- SIGKILL ------------------------------------------------------------------------------------
INTERVAL, MAX_STEPS = 10, 90


def _write_config(corpus: Path, root: Path) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": MAX_STEPS, "enable_progress_bar": False,
            "enable_model_summary": False, "num_sanity_val_steps": 0, "limit_val_batches": 0,
            "log_every_n_steps": 1, "default_root_dir": str(root),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(root), "flush_logs_every_n_steps": 1}},
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(root / "checkpoints"), "every_n_train_steps": INTERVAL,
                                         "save_top_k": -1, "save_last": True}}],
        },
        "model": {"class_path": "lightning_transformer.Seq2SeqTransformer", "init_args": TINY_MODEL},
        "data": {"class_path": "lightning_transformer.data.TranslationDataModule",
                 "init_args": {"dataset": str(corpus), "format": "tsv", "vocab_size": 300, "max_tokens": 600,
                               "max_length": 64, "cache_dir": str(root / "cache")}},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _logged_steps(metrics: Path) -> list[int]:
    if not metrics.is_file():
        return []
    with metrics.open() as handle:
        return [int(row["step"]) for row in csv.DictReader(handle) if row.get("train/loss")]


def _fit(config: Path, root: Path, version: int, ckpt_path: Path | None, kill_after_step: int | None) -> list[int]:
    """Run ``fit`` in a subprocess; SIGKILL it once it has logged ``kill_after_step``. Returns the logged steps."""
    args = [sys.executable, "-m", "lightning_transformer.cli", "fit", "--config", str(config)]
    if ckpt_path is not None:
        args += ["--ckpt_path", str(ckpt_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(args, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = root / "lightning_logs" / f"version_{version}" / "metrics.csv"
    deadline = time.monotonic() + 300
    while kill_after_step is not None and process.poll() is None and time.monotonic() < deadline:
        steps = _logged_steps(metrics)
        if steps and steps[-1] >= kill_after_step:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    _, stderr = process.communicate(timeout=300)
    if kill_after_step is None:
        assert process.returncode == 0, stderr.decode()[-3000:]
    else:
        assert process.returncode == -signal.SIGKILL, f"the run ended before step {kill_after_step}"
    return _logged_steps(metrics)


def test_runs_killed_with_sigkill_resume_from_their_last_checkpoint(small_corpus, tmp_path):
    config = _write_config(small_corpus, tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    resume_from, resumed_at = None, 0
    for version, kill_after in enumerate((15, 42, 67)):
        logged = _fit(config, tmp_path, version, resume_from, kill_after)
        assert logged[0] <= resumed_at + 1  # each run continues where its checkpoint left off
        for path in (tmp_path / "checkpoints").glob("*.ckpt"):  # none is half-written
            load_checkpoint(path, mmap=True)
        resumed_at = load_checkpoint(last, mmap=True)["global_step"]
        assert logged[-1] - resumed_at <= INTERVAL  # at most one checkpoint interval of work is lost
        resume_from = last
    logged = _fit(config, tmp_path, 3, resume_from, None)
    assert logged[0] <= resumed_at + 1 and load_checkpoint(last, mmap=True)["global_step"] == MAX_STEPS


# ----- per-rank random state under DDP -------------------------------------------------------------
def test_every_ddp_rank_resumes_with_its_own_random_state(tmp_path):
    """Only rank 0 writes the checkpoint, yet each of 2 gloo ranks gets its own state back."""
    script = Path(__file__).with_name("ddp_resume_run.py")
    for phase in ("save", "resume"):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        result = subprocess.run([sys.executable, str(script), "--phase", phase, "--output", str(tmp_path)],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    saved, resumed = ([torch.load(tmp_path / f"rank{rank}-{phase}.pt") for rank in (0, 1)]
                      for phase in ("save", "resume"))
    assert not torch.equal(saved[0], saved[1])
    assert torch.equal(resumed[0], saved[0]) and torch.equal(resumed[1], saved[1])


def test_resuming_on_another_number_of_processes_warns_and_keeps_each_ranks_own_state():
    states = [{"torch": torch.manual_seed(seed).get_state()} for seed in (0, 1)]
    for rank, world_size, expected in ((1, 4, states[1]), (3, 4, None), (0, 1, states[0])):
        callback = ResumeRandomState()
        callback.on_load_checkpoint(None, None, {"rng_states": states})
        trainer = SimpleNamespace(global_rank=rank, world_size=world_size)
        torch.manual_seed(99)
        before = torch.get_rng_state()
        with pytest.warns(UserWarning, match=f"random states of 2 processes, but this run has {world_size}"):
            callback.on_train_batch_start(trainer, None, None, 0)
        assert torch.equal(torch.get_rng_state(), before if expected is None else expected["torch"])
