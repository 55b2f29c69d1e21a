import subprocess
import sys

import pytest
import torch

from lightning_transformer.cli.average import average_checkpoints, last_checkpoints
from lightning_transformer.data.tokenizer import Tokenizer


def step_checkpoints(root):
    return sorted((root / "checkpoints").glob("*step=*.ckpt"), key=lambda p: int(p.stem.split("step=")[1]))


def test_average_is_the_elementwise_mean(small_run):
    root, _, _ = small_run
    paths = step_checkpoints(root)[-2:]
    averaged = average_checkpoints(paths)["state_dict"]
    first, second = (torch.load(p, weights_only=False)["state_dict"] for p in paths)
    for name, value in averaged.items():
        assert value.dtype == first[name].dtype
        assert torch.allclose(value, (first[name] + second[name]) / 2, atol=1e-7), name


def test_last_checkpoints_are_chosen_by_training_step(small_run):
    root, _, _ = small_run
    assert last_checkpoints(root / "checkpoints", 2) == step_checkpoints(root)[-2:]
    with pytest.raises(ValueError, match="fewer than the 50"):
        last_checkpoints(root / "checkpoints", 50)


def test_average_command_writes_a_loadable_checkpoint_and_never_overwrites(small_run, tmp_path):
    root, _, _ = small_run
    output = tmp_path / "averaged.ckpt"
    command = [sys.executable, "-m", "lightning_transformer.cli", "average", "--dir", str(root / "checkpoints"),
               "--last", "3", "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(torch.load(output, weights_only=False)["averaged_from"]) == 3
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "exists" in again.stderr


def test_mismatched_checkpoints_are_refused(small_run, tmp_path):
    root, _, _ = small_run
    path = step_checkpoints(root)[-1]
    other = torch.load(path, weights_only=False)
    other["state_dict"].pop(next(iter(other["state_dict"])))
    torch.save(other, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="other parameters"):
        average_checkpoints([path, tmp_path / "other.ckpt"])


def edited_copy(path, tmp_path, name, edit):
    checkpoint = torch.load(path, weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("change, message", [
    (dict(nhead=2), r"nhead \(4 in .* vs 2 in .*\)"),
    (dict(norm_first=True, dropout=0.3), r"dropout \(0\.0 in .* vs 0\.3 in .*\), norm_first \(False"),
])
def test_checkpoints_of_other_hyperparameters_are_refused(small_run, tmp_path, change, message):
    """Same parameter names and shapes, another architecture: the mean would be meaningless."""
    path = step_checkpoints(small_run[0])[-1]
    other = edited_copy(path, tmp_path, "other.ckpt", lambda c: c["hyper_parameters"].update(change))
    with pytest.raises(ValueError, match=f"other hyperparameters than .*: {message}.*one run only"):
        average_checkpoints([path, other])


def test_checkpoints_with_another_tokenizer_are_refused(small_run, tmp_path):
    path = step_checkpoints(small_run[0])[-1]
    tokenizer = Tokenizer.train(["Another corpus, another vocabulary."] * 10, vocab_size=300)
    other = edited_copy(path, tmp_path, "other.ckpt",
                        lambda c: c["TranslationDataModule"].update(tokenizer=tokenizer.to_str()))
    with pytest.raises(ValueError, match="another tokenizer than .*same token ids"):
        average_checkpoints([path, other])


def test_checkpoints_of_another_model_class_are_refused(small_run, tmp_path):
    path = step_checkpoints(small_run[0])[-1]
    other = edited_copy(path, tmp_path, "other.ckpt", lambda c: c.update(model_class="somewhere.Else"))
    ours = r"lightning_transformer\.modules\.seq2seq\.Seq2Seq"
    with pytest.raises(ValueError, match=rf"saved by somewhere\.Else, .* by {ours}"):
        average_checkpoints([path, other])


def test_asking_for_no_checkpoints_is_refused_not_read_as_all(small_run):
    with pytest.raises(ValueError, match="cannot average the last 0 checkpoints"):
        last_checkpoints(small_run[0] / "checkpoints", 0)
