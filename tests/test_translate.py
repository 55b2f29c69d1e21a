import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_transformer import Seq2SeqTransformer
from lightning_transformer.callbacks import TranslationWriter
from lightning_transformer.cli.average import average_checkpoints
from lightning_transformer.cli.translate import load_translator, open_translator, tokenizer_from_checkpoint, translate

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ["I am hungry.", "Where is the station?", "Tom likes cats.", "Go."]


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "lightning_transformer.cli", "translate", *args],
                          capture_output=True, text=True, timeout=300, **kwargs)


def test_translate_a_file_from_a_demo_checkpoint(demo_run, tmp_path):
    checkpoint = next(demo_run.rglob("last.ckpt"))
    source, target = tmp_path / "in.en", tmp_path / "out.es"
    source.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    result = cli(str(checkpoint), "--input", str(source), "--output", str(target), "--beam-size", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = target.read_text(encoding="utf-8").splitlines()
    model, tokenizer = load_translator(checkpoint)
    assert lines == translate(model, tokenizer, SENTENCES, beam_size=2)
    assert len(lines) == len(SENTENCES)


def test_translate_reads_stdin_and_writes_stdout(small_run):
    root, _, _ = small_run
    result = cli(str(root / "checkpoints" / "last.ckpt"), input="\n".join(SENTENCES) + "\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(result.stdout.splitlines()) == len(SENTENCES)


def test_translation_is_independent_of_batching(small_run):
    root, _, _ = small_run
    model, tokenizer = load_translator(root / "checkpoints" / "last.ckpt")
    together = translate(model, tokenizer, SENTENCES, batch_size=4)
    assert together == [translate(model, tokenizer, [s], batch_size=1)[0] for s in SENTENCES]


def test_existing_output_is_never_overwritten(small_run, tmp_path):
    root, _, _ = small_run
    target = tmp_path / "out.txt"
    target.write_text("keep me\n")
    result = cli(str(root / "checkpoints" / "last.ckpt"), "--output", str(target), input="Hi.\n")
    assert result.returncode != 0 and "exists" in result.stderr
    assert target.read_text() == "keep me\n"


def test_missing_and_truncated_checkpoints_give_clear_errors(small_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_translator(tmp_path / "nope.ckpt")
    root, _, _ = small_run
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes((root / "checkpoints" / "last.ckpt").read_bytes()[:1000])
    with pytest.raises(ValueError, match="could not be read"):
        load_translator(truncated)


def test_tokenizer_larger_than_the_models_vocabulary_is_refused(small_run, tmp_path):
    root, _, _ = small_run
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["hyper_parameters"].update(src_vocab_size=100, tgt_vocab_size=100)
    checkpoint["state_dict"] = Seq2SeqTransformer(**checkpoint["hyper_parameters"]).state_dict()
    path = tmp_path / "mismatch.ckpt"
    torch.save(checkpoint, path)
    tokens = tokenizer_from_checkpoint(checkpoint).vocab_size
    with pytest.raises(ValueError, match=f"has {tokens} tokens but the model only 100.*inconsistent"):
        load_translator(path)


def test_missing_input_file_is_a_clear_error(small_run, tmp_path):
    checkpoint = small_run[0] / "checkpoints" / "last.ckpt"
    result = cli(str(checkpoint), "--input", str(tmp_path / "absent.txt"), "--output", str(tmp_path / "out.txt"))
    assert result.returncode != 0 and "absent.txt does not exist" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out.txt").exists()


def test_checkpoint_without_tokenizer_is_refused(small_run, tmp_path):
    root, _, _ = small_run
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)
    checkpoint.pop("TranslationDataModule")
    with pytest.raises(ValueError, match="holds no tokenizer"):
        tokenizer_from_checkpoint(checkpoint)


def test_predict_subcommand_writes_translations_in_split_order(demo_run, tmp_path):
    checkpoint = next(demo_run.rglob("last.ckpt"))
    output = tmp_path / "test.es"
    result = subprocess.run(
        [sys.executable, "-m", "lightning_transformer.cli", "predict", "--config", str(ROOT / "configs/demo.yaml"),
         "--ckpt_path", str(checkpoint), "--trainer.limit_predict_batches", "1", "--trainer.enable_progress_bar",
         "false", "--trainer.logger", "false", "--model.init_args.beam_size", "1",
         "--trainer.callbacks+=lightning_transformer.callbacks.TranslationWriter",
         f"--trainer.callbacks.output={output}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = output.read_text(encoding="utf-8").splitlines()
    assert 0 < len(lines) <= 2000


def test_prediction_writer_refuses_an_existing_file(tmp_path):
    (tmp_path / "out.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="exists"):
        TranslationWriter(str(tmp_path / "out.txt"))


class Sharpened(Seq2SeqTransformer):
    """A research subclass with a hyperparameter of its own that changes its translations."""

    def __init__(self, temperature: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.temperature = temperature

    def project(self, states):
        return super().project(states) / self.temperature


@pytest.fixture(scope="module")
def subclass_checkpoint(small_run, tmp_path_factory):
    """``Sharpened(temperature=0.5)`` with small_run's weights, saved by a Trainer after one step."""
    root, _, data = small_run
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    model = Sharpened(temperature=0.5, **{k: v for k, v in checkpoint["hyper_parameters"].items()
                                          if not k.startswith("_")})
    model.load_state_dict(checkpoint["state_dict"])
    folder = tmp_path_factory.mktemp("subclass")
    trainer = Trainer(default_root_dir=folder, max_steps=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(model, data)
    trainer.save_checkpoint(folder / "sharpened.ckpt")
    return folder / "sharpened.ckpt"


def test_translate_loads_the_checkpoints_own_class_with_all_its_hyperparameters(subclass_checkpoint, tmp_path):
    model, _ = load_translator(subclass_checkpoint)
    assert type(model) is Sharpened and model.temperature == 0.5 and model.hparams.temperature == 0.5
    # An averaged subclass checkpoint is still that subclass.
    averaged = tmp_path / "averaged.ckpt"
    torch.save(average_checkpoints([subclass_checkpoint, subclass_checkpoint]), averaged)
    model, _ = load_translator(averaged)
    assert type(model) is Sharpened and model.temperature == 0.5


def test_checkpoints_from_before_the_class_was_recorded_load_the_base_class(small_run, tmp_path):
    checkpoint = torch.load(small_run[0] / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint.pop("model_class", None)
    torch.save(checkpoint, tmp_path / "old.ckpt")
    model, _ = load_translator(tmp_path / "old.ckpt")
    assert type(model) is Seq2SeqTransformer


@pytest.mark.parametrize("name, message", [
    ("nowhere.Missing", "nowhere.Missing, which cannot be imported .*No module named 'nowhere'.*PYTHONPATH"),
    ("lightning_transformer.modules.seq2seq.Missing", "cannot be imported .*has no attribute 'Missing'"),
    ("collections.OrderedDict", "collections.OrderedDict, which is not a Seq2SeqTransformer subclass"),
])
def test_unimportable_or_foreign_model_classes_are_refused(small_run, tmp_path, name, message):
    checkpoint = torch.load(small_run[0] / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["model_class"] = name
    torch.save(checkpoint, tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match=message):
        load_translator(tmp_path / "foreign.ckpt")


def test_hyperparameters_the_class_does_not_take_are_refused_not_dropped(small_run, tmp_path):
    """An old subclass checkpoint, without its class recorded, would otherwise load as a different model."""
    checkpoint = torch.load(small_run[0] / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint.pop("model_class", None)
    checkpoint["hyper_parameters"]["temperature"] = 0.5
    torch.save(checkpoint, tmp_path / "old_subclass.ckpt")
    with pytest.raises(ValueError, match=r"hyperparameters \['temperature'\] that Seq2SeqTransformer does not take"):
        load_translator(tmp_path / "old_subclass.ckpt")


# ----- n-best lists and sampling, from a checkpoint and from its CTranslate2 export --------------------------------
NBEST_LINE = re.compile(r"^(\d+) \|\|\| (.*) \|\|\| F0= (-?\d+\.\d{4}) \|\|\| (-?\d+\.\d{4})$")


@pytest.fixture(scope="module")
def engines(small_run, small_corpus, tmp_path_factory):
    """``{"checkpoint": path, "ct2": its export folder}`` (no ct2 without the extra), a 12-line file, its lines."""
    checkpoint = small_run[0] / "checkpoints" / "last.ckpt"
    folder = tmp_path_factory.mktemp("engines")
    paths = {"checkpoint": checkpoint}
    try:
        from lightning_transformer.export.ct2 import export_ct2

        paths["ct2"] = export_ct2(*load_translator(checkpoint), folder / "ct2", None)
    except ImportError:
        pass
    lines = (small_corpus / "validation.tsv").read_text(encoding="utf-8").splitlines()[1:9]
    sentences = SENTENCES + [line.split("\t")[0] for line in lines]
    (folder / "in.txt").write_text("".join(s + "\n" for s in sentences), encoding="utf-8")
    return paths, folder / "in.txt", sentences


def engine_path(engines, name):
    if name not in engines[0]:
        pytest.skip("ctranslate2 is not installed")
    return engines[0][name]


@pytest.mark.parametrize("engine", ["checkpoint", "ct2"])
def test_nbest_lists_from_the_command_line(engines, engine):
    path, (_, source, sentences) = engine_path(engines, engine), engines
    result = cli(str(path), "--input", str(source), "--nbest", "2")  # the model's beam size is 2
    assert result.returncode == 0, result.stderr[-2000:]
    parsed = [NBEST_LINE.match(line) for line in result.stdout.splitlines()]
    assert all(parsed) and len(parsed) == 2 * len(sentences)
    assert [int(m[1]) for m in parsed] == [i for i in range(len(sentences)) for _ in range(2)]
    scores = [float(m[4]) for m in parsed]
    assert all(scores[i] >= scores[i + 1] for i in range(0, len(scores), 2))  # best first
    assert all(float(m[3]) <= float(m[4]) < 0 for m in parsed)  # F0 over a GNMT penalty >= 1
    assert [m[2] for m in parsed[::2]] == open_translator(str(path)).translate(sentences)


@pytest.mark.parametrize("engine", ["checkpoint", "ct2"])
def test_sampling_from_the_command_line_is_the_seeded_library_call(engines, engine):
    path, (_, source, sentences) = engine_path(engines, engine), engines
    result = cli(str(path), "--input", str(source), "--sampling", "--temperature", "0.8", "--top-p", "0.9",
                 "--seed", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    expected = open_translator(str(path), seed=3).sample(sentences, temperature=0.8, top_p=0.9)
    assert result.stdout.splitlines() == expected


@pytest.mark.parametrize("engine", ["checkpoint", "ct2"])
def test_sampling_is_reproducible_differs_by_seed_and_tends_to_greedy(engines, engine):
    path, (_, _, sentences) = engine_path(engines, engine), engines
    draws = [open_translator(str(path), seed=seed).sample(sentences) for seed in (1, 1, 2)]
    assert draws[0] == draws[1] != draws[2]
    translator = open_translator(str(path), seed=1)
    greedy = translator.translate(sentences, beam_size=1)
    assert translator.sample(sentences, temperature=1e-3) == greedy
    assert translator.sample(sentences, top_k=1) == greedy
    assert translator.sample(sentences, temperature=0.0) == greedy
