import importlib
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
import yaml

from lightning_transformer.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAPER = ("trainer/paper.yaml", "data/wmt14_en_de.yaml")
#: Every run the README names, as the --config files it composes, in order.
RUNS = {
    "demo": ("demo.yaml",),
    "lm_demo": ("lm_demo.yaml",),
    "multi30k_en_de": ("multi30k_en_de.yaml",),
    "multi30k_en_de_tiny": ("multi30k_en_de_tiny.yaml",),
    "base": (PAPER[0], "model/base.yaml", PAPER[1]),
    "big": (PAPER[0], "model/big.yaml", PAPER[1]),
    "multinode": (PAPER[0], "model/base.yaml", PAPER[1], "trainer/multinode.yaml"),
}


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "lightning_transformer.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_console_script_is_registered():
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("lightning-transformer") == "lightning_transformer.cli:main"


def printed_config(files, capsys, monkeypatch, *extra) -> dict:
    """What `lightning-transformer fit --config F1 --config F2 ... --print_config` prints, as a dict."""
    monkeypatch.setattr(sys, "argv", ["lightning-transformer"])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *(arg for name in files for arg in ("--config", str(ROOT / "configs" / name))), *extra,
              "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("run", RUNS, ids=str)
def test_every_run_parses_and_builds_its_model(run, capsys, monkeypatch):
    printed = printed_config(RUNS[run], capsys, monkeypatch)
    for name in RUNS[run]:
        given = yaml.safe_load((ROOT / "configs" / name).read_text()).get("model", {}).get("init_args", {})
        for key, value in given.items():
            expected = list(value) if isinstance(value, (list, tuple)) else value
            assert printed["model"]["init_args"][key] == expected, (name, key)
    module_name, _, class_name = printed["model"]["class_path"].rpartition(".")
    model_class = getattr(importlib.import_module(module_name), class_name)
    with torch.device("meta"):  # validates every hyperparameter without allocating the weights
        model_class(**printed["model"]["init_args"])


@pytest.mark.parametrize("run", RUNS, ids=str)
def test_every_run_gets_the_shared_defaults(run, capsys, monkeypatch):
    trainer = printed_config(RUNS[run], capsys, monkeypatch)["trainer"]
    assert trainer["use_distributed_sampler"] is False
    callbacks = [c["class_path"].rpartition(".")[2] for c in trainer["callbacks"]]
    assert callbacks[:3] == ["LearningRateMonitor", "TokenThroughput", "TrainingDoctor"]
    assert callbacks.count("ModelCheckpoint") == 1


@pytest.mark.parametrize("run", ["demo", "lm_demo", "multi30k_en_de"])
def test_a_precision_beside_the_configs_precision_plugin_is_refused_in_one_line(run, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-transformer"])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *(arg for name in RUNS[run] for arg in ("--config", str(ROOT / "configs" / name))),
              "--trainer.precision", "bf16-mixed"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: trainer.precision bf16-mixed and the precision plugin BF16MasterWeights")
    assert "--trainer.plugins null" in message
    printed = printed_config(RUNS[run], capsys, monkeypatch, "--trainer.plugins", "null", "--trainer.precision",
                             "bf16-mixed")
    assert (printed["trainer"]["precision"], printed["trainer"]["plugins"]) == ("bf16-mixed", None)


def test_every_config_file_is_part_of_a_run():
    used = {name for files in RUNS.values() for name in files}
    assert {str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml")} == used


def differences(a, b, prefix=""):
    """Dotted keys where two printed configs differ (lists compare whole)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {d for key in a.keys() | b.keys() for d in differences(a.get(key), b.get(key), f"{prefix}{key}.")}
    return set() if a == b else {prefix.rstrip(".")}


def test_paper_runs_differ_only_where_the_paper_does(capsys, monkeypatch):
    base, big, multinode = (printed_config(RUNS[run], capsys, monkeypatch) for run in ("base", "big", "multinode"))
    assert differences(base, big) == {"trainer.max_steps", *(f"model.init_args.{key}" for key in (
        "d_model", "nhead", "dim_feedforward", "dropout"))}
    assert differences(base, multinode) == {"trainer.accelerator", "trainer.num_nodes", "trainer.strategy",
                                            "data.init_args.max_tokens"}
    hp, big_hp = base["model"]["init_args"], big["model"]["init_args"]
    assert (hp["d_model"], hp["dim_feedforward"], hp["nhead"], hp["dropout"]) == (512, 2048, 8, 0.1)
    assert (big_hp["d_model"], big_hp["dim_feedforward"], big_hp["nhead"], big_hp["dropout"]) == (1024, 4096, 16, 0.3)
    assert (base["trainer"]["max_steps"], big["trainer"]["max_steps"]) == (100000, 300000)
    for hp in (hp, big_hp):
        assert hp["num_encoder_layers"] == hp["num_decoder_layers"] == 6
        assert hp["warmup_steps"] == 4000 and hp["label_smoothing"] == 0.1 and hp["scheduler"] == "noam"


def test_the_tiny_multi30k_run_differs_from_the_main_one_only_in_size_vocabulary_rates_and_regularisation(capsys,
                                                                                                       monkeypatch):
    # A whole file rather than an overlay: callbacks are a list, which a later --config replaces whole.
    main_run, tiny = (printed_config(RUNS[run], capsys, monkeypatch)
                      for run in ("multi30k_en_de", "multi30k_en_de_tiny"))
    assert differences(main_run, tiny) == {
        "trainer.default_root_dir", "data.init_args.max_tokens", "data.init_args.vocab_size",
        *(f"model.init_args.{key}" for key in (
            "d_model", "num_encoder_layers", "num_decoder_layers", "dim_feedforward", "lr", "warmup_steps",
            "dropout", "attention_dropout", "activation_dropout", "weight_decay"))}


def test_print_config_from_the_command_line(tmp_path):
    result = run_cli("fit", "--config", str(ROOT / "configs/demo.yaml"), "--print_config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "lightning_transformer.Seq2SeqTransformer" in result.stdout
    assert "gradient_clip_val: 1.0" in result.stdout


def test_fit_demo_config_end_to_end_writes_everything_under_default_root_dir(demo_run):
    version = demo_run / "lightning_logs" / "version_0"
    assert (version / "checkpoints" / "last.ckpt").is_file(), "fit should leave a checkpoint"
    assert (version / "metrics.csv").is_file() and (version / "tokenizer.json").is_file()
    assert not any((demo_run.parent / "cwd").iterdir()), "nothing lands in the working directory"


def test_unknown_config_key_is_refused_with_its_name(tmp_path):
    result = run_cli("fit", "--config", str(ROOT / "configs/demo.yaml"), "--model.init_args.d_modle", "64",
                     cwd=tmp_path)
    assert result.returncode != 0
    assert "d_modle" in result.stderr


def test_mistyped_value_and_missing_config_file_name_the_problem(tmp_path):
    result = run_cli("fit", "--config", str(ROOT / "configs/demo.yaml"), "--model.init_args.d_model", "wide",
                     cwd=tmp_path)
    assert result.returncode != 0 and "d_model" in result.stderr and "wide" in result.stderr
    result = run_cli("fit", "--config", str(tmp_path / "absent.yaml"), cwd=tmp_path)
    assert result.returncode != 0 and "absent.yaml" in result.stderr
    assert "Traceback" not in result.stderr
