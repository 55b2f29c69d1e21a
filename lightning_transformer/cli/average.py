"""``lightning-transformer average``: the mean of the last N checkpoints' weights (the paper averaged 5 for base
models)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint, stored_tokenizer
from . import io


def average_checkpoints(paths: Sequence[str | Path]) -> dict:
    """The last checkpoint of ``paths`` with its ``state_dict`` replaced by the element-wise mean.

    Floating-point tensors are averaged in float64 and cast back; other entries (the model class
    among them) come from the last checkpoint. All checkpoints must hold the same parameter names
    and shapes, hyperparameters, tokenizer and model class.
    """
    if not paths:
        raise ValueError("no checkpoints to average; pass at least one .ckpt file.")
    total: dict[str, torch.Tensor] = {}
    checkpoint: dict = {}
    for i, path in enumerate(paths):
        checkpoint = load_checkpoint(path)
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise ValueError(f"{path} holds no model weights (no state_dict), so it is no checkpoint of "
                             "`lightning-transformer fit`; average the .ckpt files that fit wrote.")
        if i == 0:
            first = _identity(checkpoint)
        else:
            _check_same_model(first, _identity(checkpoint), paths[0], path)
        state = checkpoint["state_dict"]
        if total and state.keys() != total.keys():
            raise ValueError(f"{path} holds other parameters than {paths[0]}; average checkpoints of one run only.")
        for name, tensor in state.items():
            if name in total and total[name].shape != tensor.shape:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)} in {path} but {tuple(total[name].shape)} "
                                 "before; average checkpoints of one run only.")
            if tensor.is_floating_point():
                total[name] = total[name] + tensor.double() if name in total else tensor.double()
            else:
                total[name] = tensor
    checkpoint["state_dict"] = {
        name: (tensor / len(paths)).to(checkpoint["state_dict"][name].dtype) if tensor.is_floating_point() else tensor
        for name, tensor in total.items()
    }
    checkpoint["averaged_from"] = [str(p) for p in paths]
    return checkpoint


def _identity(checkpoint: dict) -> dict:
    """What must agree for a mean of weights to be one model."""
    return {"hyper_parameters": checkpoint.get("hyper_parameters", {}), "tokenizer": stored_tokenizer(checkpoint),
            "model_class": checkpoint.get("model_class")}


def _check_same_model(first: dict, other: dict, first_path: str | Path, path: str | Path) -> None:
    hparams, other_hparams = first["hyper_parameters"], other["hyper_parameters"]
    differences = [
        f"{name} ({_value(hparams, name)} in {first_path} vs {_value(other_hparams, name)} in {path})"
        for name in sorted(hparams.keys() | other_hparams.keys())
        if name not in hparams or name not in other_hparams or hparams[name] != other_hparams[name]
    ]
    if differences:
        raise ValueError(f"{path} was saved with other hyperparameters than {first_path}: "
                         f"{', '.join(differences)}; average checkpoints of one run only.")
    if other["tokenizer"] != first["tokenizer"]:
        raise ValueError(f"{path} holds another tokenizer than {first_path}, so the same token ids would stand for "
                         "other text; average checkpoints of one run only.")
    # Checkpoints from before the class was recorded lack it; their hyperparameters were compared above.
    if None not in (first["model_class"], other["model_class"]) and other["model_class"] != first["model_class"]:
        raise ValueError(f"{path} was saved by {other['model_class']}, {first_path} by {first['model_class']}; "
                         "average checkpoints of one run only.")


def _value(hparams: dict, name: str) -> str:
    return repr(hparams[name]) if name in hparams else "unset"


def last_checkpoints(folder: str | Path, n: int) -> list[Path]:
    """The ``n`` most recent checkpoints in ``folder`` by training step (``last*.ckpt`` excluded)."""
    if n < 1:  # a slice [-0:] would keep them all
        raise ValueError(f"cannot average the last {n} checkpoints; ask for 1 or more.")
    if not Path(folder).is_dir():
        raise NotADirectoryError(f"--dir {folder} is not a folder; pass the folder holding the run's checkpoints.")
    found = [p for p in Path(folder).glob("*.ckpt") if not p.name.startswith("last")]
    if len(found) < n:
        raise ValueError(
            f"{folder} holds {len(found)} step checkpoints, fewer than the {n} asked for; keep more with "
            "ModelCheckpoint(save_top_k=-1, every_n_train_steps=...) or average fewer."
        )
    steps = {p: load_checkpoint(p, mmap=True).get("global_step", 0) for p in found}
    return sorted(found, key=lambda p: (steps[p], p.stat().st_mtime))[-n:]


def main(argv: Sequence[str] | None = None) -> None:
    parser = io.ArgumentParser(prog="lightning-transformer average", description=__doc__)
    parser.add_argument("checkpoints", nargs="*", help="checkpoint files to average")
    parser.add_argument("--dir", help="average the last --last checkpoints of this folder instead")
    parser.add_argument("--last", type=io.positive_int, default=5, help="how many of --dir's checkpoints (default 5)")
    parser.add_argument("--output", "-o", required=True, help="where the averaged checkpoint goes (must not exist)")
    args = parser.parse_args(argv)
    with io.one_line_errors():
        output = io.check_new_file(args.output)
        if args.dir and args.checkpoints:
            raise ValueError("pass checkpoint files or --dir, not both; average one run's checkpoints one way.")
        paths = last_checkpoints(args.dir, args.last) if args.dir else args.checkpoints
        averaged = average_checkpoints(paths)
        tmp = output.with_name(output.name + ".tmp")
        torch.save(averaged, tmp)
        tmp.replace(output)
    print(f"averaged {len(paths)} checkpoints into {output}: " + ", ".join(str(p) for p in paths))
