"""Shared fixtures: small real corpora and trained checkpoints, built once per test session."""

import gzip
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "lightning_transformer" / "data" / "corpus"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (benchmarks/gpu_check.sh runs these on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A TSV folder with 400 training and 30 validation pairs cut from the embedded corpus."""
    folder = tmp_path_factory.mktemp("small_corpus")
    for split, source, count in (("train", "train", 400), ("validation", "validation", 30)):
        with gzip.open(CORPUS / f"{source}.tsv.gz", "rt", encoding="utf-8") as handle:
            lines = [next(handle) for _ in range(count + 1)]
        (folder / f"{split}.tsv").write_text("".join(lines), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """`lightning-transformer fit --config configs/demo.yaml` cut to 5 steps, run from an empty ``cwd`` beside
    its ``--trainer.default_root_dir``; returns that root folder."""
    base = tmp_path_factory.mktemp("demo_run")
    root, cwd = base / "root", base / "cwd"  # --trainer.default_root_dir must move every output away from cwd
    cwd.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "lightning_transformer.cli", "fit", "--config", str(ROOT / "configs/demo.yaml"),
         "--trainer.max_steps", "5", "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false",
         "--trainer.log_every_n_steps", "1", "--trainer.default_root_dir", str(root)],
        cwd=cwd, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=5` reached." in result.stderr + result.stdout
    return root


TINY_MODEL = dict(d_model=64, nhead=4, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=128,
                  dropout=0.0, share_embeddings=True, scheduler="cosine", lr=3e-3, warmup_steps=20, beam_size=2,
                  max_decode_len_a=1.0, max_decode_len_b=5)


def small_data_module(folder: Path, cache_dir: Path):
    from lightning_transformer.data import TranslationDataModule

    return TranslationDataModule(str(folder), format="tsv", vocab_size=556, max_tokens=600, max_length=64,
                                 cache_dir=str(cache_dir))


def fit_small(corpus: Path, root: Path, max_steps: int, record, ckpt_path=None, every_n_steps=None,
              model_args=None, **trainer_args):
    """A tiny model (dropout 0.1) trained ``max_steps`` on ``corpus`` from seed 0, ``record`` (a callback)
    watching; a checkpoint every ``every_n_steps`` if given. Returns the model and its data module."""
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_transformer import Seq2SeqTransformer

    seed_everything(0)
    data = small_data_module(corpus, root.parent / "cache")
    model = Seq2SeqTransformer(src_vocab_size=data.vocab_size, tgt_vocab_size=data.vocab_size,
                               **{**TINY_MODEL, "dropout": 0.1, **(model_args or {})})
    callbacks = [record]
    if every_n_steps:
        callbacks.append(ModelCheckpoint(dirpath=root, every_n_train_steps=every_n_steps, save_top_k=-1))
    Trainer(default_root_dir=root, max_steps=max_steps, logger=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks,
            enable_checkpointing=bool(every_n_steps), **trainer_args).fit(model, data, ckpt_path=ckpt_path)
    return model, data


@pytest.fixture(scope="session")
def small_run(small_corpus, tmp_path_factory):
    """A tiny model trained 200 steps on `small_corpus`, with step checkpoints every 50 steps."""
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_transformer import Seq2SeqTransformer

    root = tmp_path_factory.mktemp("small_run")
    seed_everything(0)
    data = small_data_module(small_corpus, root / "cache")
    model = Seq2SeqTransformer(src_vocab_size=556, tgt_vocab_size=556, **TINY_MODEL)
    checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=50, save_top_k=-1, save_last=True)
    trainer = Trainer(default_root_dir=root, max_steps=200, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                      callbacks=[checkpoints])
    trainer.fit(model, data)
    return root, model.eval(), data
