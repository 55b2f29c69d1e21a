"""Every command refuses bad input with one line ``error: <problem>; <fix>`` and a non-zero exit, never a traceback.

The refusals run in-process through the commands' ``main`` (one subprocess costs ~5 s of imports), with
stdin, stdout and stderr swapped and a ``SystemExit`` turned into an exit status as the interpreter does;
any other exception fails the test, as a traceback would. One subprocess per command checks that a real
process ends the same way.
"""

import contextlib
import io
import shutil
import subprocess
import sys

import pytest
import torch

from lightning_transformer import Seq2SeqTransformer
from lightning_transformer.cli.main import TOOLS
from lightning_transformer.data.tokenizer import Tokenizer
from lightning_transformer.modules.causal_lm import CausalLMTransformer

LINES = ["the cat sat on the mat .", "where is the station ?", "el gato come pescado ."]


def save(model, data_module: str, tokenizer: Tokenizer, path):
    """``model`` as `fit` saves it: hyperparameters, weights, class and the data module's tokenizer."""
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict(), "global_step": 1,
                "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
                data_module: {"tokenizer": tokenizer.to_str()}}, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Name -> path of a tiny translation (MT) and language-model (LM) checkpoint, their ilk of bad files, inputs."""
    folder = tmp_path_factory.mktemp("cli_errors")
    tokenizer = Tokenizer.train(LINES * 10, vocab_size=300)
    torch.manual_seed(0)
    size = dict(d_model=32, nhead=4, dim_feedforward=64, max_len=32)
    translator = Seq2SeqTransformer(tokenizer.vocab_size, tokenizer.vocab_size, num_encoder_layers=1,
                                    num_decoder_layers=1, beam_size=2, **size)
    lm = CausalLMTransformer(vocab_size=tokenizer.vocab_size, num_layers=1, **size)
    paths = {"MT": save(translator, "TranslationDataModule", tokenizer, folder / "mt.ckpt"),
             "LM": save(lm, "LanguageModelDataModule", tokenizer, folder / "lm.ckpt"),
             "TRUNCATED": folder / "truncated.ckpt", "NO_WEIGHTS": folder / "no_weights.ckpt",
             "SRC": folder / "src.txt", "TGT2": folder / "tgt2.txt", "EXISTS": folder / "exists.txt",
             "EMPTY_DIR": folder / "empty", "LATIN1": folder / "latin1.txt"}
    paths["TRUNCATED"].write_bytes(paths["MT"].read_bytes()[:1000])
    torch.save({"weights": torch.zeros(2)}, paths["NO_WEIGHTS"])
    paths["SRC"].write_text("".join(line + "\n" for line in LINES), encoding="utf-8")
    paths["TGT2"].write_text("el gato .\ndonde ?\n", encoding="utf-8")
    paths["EXISTS"].write_text("keep me\n", encoding="utf-8")
    paths["EMPTY_DIR"].mkdir()
    paths["LATIN1"].write_bytes("año\n".encode("latin-1"))
    try:
        from lightning_transformer.export.ct2 import export_ct2

        paths["CT2"] = export_ct2(translator, tokenizer, folder / "ct2")
        paths["CT2_DAMAGED"] = shutil.copytree(paths["CT2"], folder / "ct2_damaged")
        (paths["CT2_DAMAGED"] / "model.bin").write_bytes((paths["CT2"] / "model.bin").read_bytes()[:500])
    except ImportError:
        pass
    return paths


def run(command: str, args: list[str], files: dict, stdin: str = "Hi.\n") -> tuple[int, str]:
    """``lightning-transformer COMMAND ARGS`` in-process: (exit status, stderr); placeholders name ``files``."""
    if any(arg.startswith("CT2") and arg not in files for arg in args):
        pytest.skip("needs the ctranslate2 extra")
    args = [str(files.get(arg, arg)) for arg in args]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        sys_stdin, sys.stdin = sys.stdin, io.StringIO(stdin)
        try:
            TOOLS[command](args)
            status = 0
        except SystemExit as exit:  # what the interpreter does with it
            if isinstance(exit.code, str):
                print(exit.code, file=sys.stderr)
            status = 1 if isinstance(exit.code, str) else exit.code or 0
        finally:
            sys.stdin = sys_stdin
    return status, stderr.getvalue()


REFUSALS = {
    "translate": [
        (["absent.ckpt"], "checkpoint absent.ckpt does not exist"),
        (["TRUNCATED"], "could not be read"),
        (["NO_WEIGHTS"], "holds no model weights"),
        (["EMPTY_DIR"], "is no CTranslate2 export"),
        (["CT2_DAMAGED"], "could not be loaded as a CTranslate2 export (RuntimeError"),
        (["LM"], "not a Seq2SeqTransformer subclass"),
        (["MT", "--input", "absent.txt"], "input file absent.txt does not exist"),
        (["MT", "--input", "LATIN1"], "is not UTF-8 text"),
        (["MT", "--output", "EXISTS"], "exists; choose another --output"),
        (["MT", "--output", "nowhere/out.txt"], "the folder of --output nowhere/out.txt does not exist"),
        (["MT", "--beam-size", "-1"], "argument --beam-size: -1 is not a positive integer"),
        (["MT", "--beam-size", "two"], "argument --beam-size: invalid"),
        (["MT", "--nbest", "3"], "--nbest 3 exceeds the model's beam size 2"),
        (["CT2", "--nbest", "3"], "--nbest 3 exceeds the model's beam size 2"),
        (["MT", "--nbest", "3", "--beam-size", "2"], "--nbest 3 exceeds --beam-size 2"),
        (["MT", "--sampling", "--temperature", "-0.5"], "temperature=-0.5 is negative"),
        (["MT", "--sampling", "--top-p", "1.5"], "top_p=1.5 is outside (0, 1]"),
        (["CT2", "--sampling", "--top-p", "0"], "top_p=0.0 is outside (0, 1]"),
        (["MT", "--sampling", "--top-k", "0"], "top_k=0 keeps no token"),
        (["MT", "--top-k", "5"], "--top-k applies to --sampling only"),
        (["MT", "--sampling", "--nbest", "2"], "so --nbest does not apply"),
        (["MT", "--device", "gpu"], "unknown device 'gpu'"),
    ],
    "score": [
        (["absent.ckpt", "-s", "SRC", "-t", "SRC"], "checkpoint absent.ckpt does not exist"),
        (["TRUNCATED", "-s", "SRC", "-t", "SRC"], "could not be read"),
        (["EMPTY_DIR", "-s", "SRC", "-t", "SRC"], "is no CTranslate2 export"),
        (["CT2_DAMAGED", "-s", "SRC", "-t", "SRC"], "could not be loaded as a CTranslate2 export"),
        (["LM", "-s", "SRC", "-t", "SRC"], "not a Seq2SeqTransformer subclass"),
        (["MT", "-s", "SRC", "-t", "absent.txt"], "input file absent.txt does not exist"),
        (["MT", "-s", "SRC", "-t", "-"], "not stdin"),
        (["MT", "-s", "SRC", "-t", "SRC", "-o", "EXISTS"], "exists; choose another --output"),
        (["MT", "-s", "SRC", "-t", "TGT2"], "--source has 3 lines but --target 2"),
        (["CT2", "-s", "SRC", "-t", "TGT2"], "--source has 3 lines but --target 2"),
        (["MT", "-s", "SRC"], "the following arguments are required: --target"),
        (["MT", "-s", "SRC", "-t", "SRC", "--batch-size", "0"], "argument --batch-size: 0 is not a positive integer"),
    ],
    "generate": [
        (["absent.ckpt"], "checkpoint absent.ckpt does not exist"),
        (["TRUNCATED"], "could not be read"),
        (["MT"], "not a CausalLMTransformer subclass"),
        (["CT2"], "is a folder, not a checkpoint"),
        (["LM", "--input", "absent.txt"], "input file absent.txt does not exist"),
        (["LM", "--temperature", "-1"], "temperature=-1.0 is negative"),
        (["LM", "--top-p", "2"], "top_p=2.0 is outside (0, 1]"),
        (["LM", "--max-new-tokens", "-3"], "argument --max-new-tokens: -3 is negative"),
    ],
    "average": [
        (["absent.ckpt", "-o", "out.ckpt"], "checkpoint absent.ckpt does not exist"),
        (["TRUNCATED", "-o", "out.ckpt"], "could not be read"),
        (["NO_WEIGHTS", "-o", "out.ckpt"], "holds no model weights"),
        (["MT", "LM", "-o", "out.ckpt"], "was saved with other hyperparameters"),
        (["MT", "-o", "EXISTS"], "exists; choose another --output"),
        (["--dir", "nowhere", "-o", "out.ckpt"], "--dir nowhere is not a folder"),
        (["--dir", "EMPTY_DIR", "--last", "0", "-o", "out.ckpt"], "argument --last: 0 is not a positive integer"),
        (["MT", "--dir", "EMPTY_DIR", "-o", "out.ckpt"], "pass checkpoint files or --dir, not both"),
        (["-o", "out.ckpt"], "no checkpoints to average"),
    ],
    "export": [
        (["absent.ckpt", "--format", "ct2", "-o", "out"], "checkpoint absent.ckpt does not exist"),
        (["TRUNCATED", "--format", "ct2", "-o", "out"], "could not be read"),
        (["LM", "--format", "ct2", "-o", "out"], "not a Seq2SeqTransformer subclass"),
        (["CT2", "--format", "ct2", "-o", "out"], "is a folder, not a checkpoint"),
        (["MT", "--format", "ct2", "-o", "EXISTS"], "exists and is not an empty folder"),
        (["MT", "--format", "onnx", "-o", "out"], "unknown --format 'onnx'"),
        (["MT", "--format", "ct2", "-o", "nowhere/out"], "the folder of --output nowhere/out does not exist"),
    ],
}


@pytest.mark.parametrize("command, args, message", [
    (command, args, message) for command, cases in REFUSALS.items() for args, message in cases
], ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_each_refusal_is_one_error_line(files, tmp_path, monkeypatch, command, args, message):
    monkeypatch.chdir(tmp_path)
    status, stderr = run(command, args, files)
    assert status != 0
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and message in stderr, stderr
    assert "Traceback" not in stderr
    assert files["EXISTS"].read_text(encoding="utf-8") == "keep me\n"  # nothing overwritten
    assert list(tmp_path.iterdir()) == []  # nor left behind


@pytest.mark.parametrize("command, args, message", [
    ("translate", ["LM"], "not a Seq2SeqTransformer subclass"),
    ("score", ["MT", "-s", "SRC", "-t", "TGT2"], "--source has 3 lines but --target 2"),
    ("generate", ["LM", "--top-p", "0"], "top_p=0.0 is outside (0, 1]"),
    ("average", ["TRUNCATED", "-o", "out.ckpt"], "could not be read"),
    ("export", ["absent.ckpt", "--format", "ct2", "-o", "out"], "checkpoint absent.ckpt does not exist"),
])
def test_a_real_process_ends_the_same_way(files, tmp_path, command, args, message):
    args = [str(files.get(arg, arg)) for arg in args]
    result = subprocess.run([sys.executable, "-m", "lightning_transformer.cli", command, *args], input="Hi.\n",
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.splitlines()[-1].startswith("error: ") and message in result.stderr.splitlines()[-1]
    assert "Traceback" not in result.stderr
