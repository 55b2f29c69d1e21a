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
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "lightning_transformer.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_console_script_is_registered():
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("lightning-transformer") == "lightning_transformer.cli:main"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses_and_builds_its_model(config, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-transformer"])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    given = yaml.safe_load(config.read_text())
    for key, value in given["model"]["init_args"].items():
        expected = list(value) if isinstance(value, (list, tuple)) else value
        assert printed["model"]["init_args"][key] == expected, key
    module_name, _, class_name = printed["model"]["class_path"].rpartition(".")
    model_class = getattr(importlib.import_module(module_name), class_name)
    with torch.device("meta"):  # validates every hyperparameter without allocating the weights
        model = model_class(**printed["model"]["init_args"])
    assert model.d_model == given["model"]["init_args"]["d_model"]


def test_paper_hyperparameters():
    base = yaml.safe_load((ROOT / "configs/base.yaml").read_text())["model"]["init_args"]
    big = yaml.safe_load((ROOT / "configs/big.yaml").read_text())["model"]["init_args"]
    assert (base["d_model"], base["dim_feedforward"], base["nhead"], base["dropout"]) == (512, 2048, 8, 0.1)
    assert (big["d_model"], big["dim_feedforward"], big["nhead"], big["dropout"]) == (1024, 4096, 16, 0.3)
    for hp in (base, big):
        assert hp["num_encoder_layers"] == hp["num_decoder_layers"] == 6
        assert hp["warmup_steps"] == 4000 and hp["label_smoothing"] == 0.1 and hp["scheduler"] == "noam"


def test_print_config_from_the_command_line(tmp_path):
    result = run_cli("fit", "--config", str(ROOT / "configs/demo.yaml"), "--print_config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "lightning_transformer.Seq2SeqTransformer" in result.stdout
    assert "gradient_clip_val: 1.0" in result.stdout


def test_fit_demo_config_end_to_end(demo_run):
    checkpoints = list(demo_run.rglob("*.ckpt"))
    assert checkpoints, "fit should leave a checkpoint"
    assert list(demo_run.rglob("metrics.csv")) and list(demo_run.rglob("tokenizer.json"))


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
