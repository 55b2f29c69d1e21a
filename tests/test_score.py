"""``score`` reports the model's own teacher-forced log-probabilities, from a checkpoint or a CTranslate2 export."""

import subprocess
import sys

import pytest
import torch

from lightning_transformer.cli.score import main as score_main
from lightning_transformer.cli.score import score
from lightning_transformer.cli.translate import CheckpointTranslator, load_translator

BOS, EOS = 1, 2


@pytest.fixture(scope="module")
def pairs(small_run, small_corpus, tmp_path_factory):
    """(checkpoint, source file, target file, sources, targets): 30 validation pairs, two of them edge cases.

    Line 2's target is empty (only EOS is scored); line 3's is another sentence's translation.
    """
    lines = (small_corpus / "validation.tsv").read_text(encoding="utf-8").splitlines()[1:]
    sources, targets = zip(*(line.split("\t")[:2] for line in lines))
    sources, targets = list(sources), list(targets)
    targets[1], targets[2] = "", targets[5]
    folder = tmp_path_factory.mktemp("score")
    (folder / "src.txt").write_text("".join(s + "\n" for s in sources), encoding="utf-8")
    (folder / "tgt.txt").write_text("".join(t + "\n" for t in targets), encoding="utf-8")
    return small_run[0] / "checkpoints" / "last.ckpt", folder / "src.txt", folder / "tgt.txt", sources, targets


def teacher_forced(model, tokenizer, source: str, target: str) -> torch.Tensor:
    """log p(token | source, prefix) of each target token then EOS, one unpadded sentence through ``forward``."""
    src = torch.tensor([tokenizer.encode(source) + [EOS]])
    tgt = torch.tensor([[BOS] + tokenizer.encode(target) + [EOS]])
    with torch.no_grad():
        log_probs = model(src, tgt[:, :-1]).log_softmax(-1)
    return log_probs[0].gather(1, tgt[0, 1:, None])[:, 0]


def parse(output: str) -> list[tuple[float, list[float]]]:
    rows = []
    for line in output.splitlines():
        total, per_token = line.split("\t")
        rows.append((float(total), [float(value) for value in per_token.split(" ")]))
    return rows


def test_scores_equal_float64_teacher_forcing_whatever_the_batching(pairs):
    checkpoint, _, _, sources, targets = pairs
    model, tokenizer = load_translator(checkpoint)
    reference = load_translator(checkpoint)[0].double()
    # Batches of 7 sorted by length: padded sources and targets in every batch.
    scored = score(CheckpointTranslator(model, tokenizer), sources, targets, batch_size=7)
    assert len(scored) == len(sources) and len(scored[1]) == 1  # an empty target: EOS alone
    for source, target, log_probs in zip(sources, targets, scored):
        expected = teacher_forced(reference, tokenizer, source, target)
        assert torch.allclose(torch.tensor(log_probs, dtype=torch.float64), expected, atol=1e-4, rtol=0)


def test_checkpoint_and_ct2_scores_agree_from_the_command_line(pairs, tmp_path):
    pytest.importorskip("ctranslate2")
    from lightning_transformer.export.ct2 import export_ct2

    checkpoint, source_file, target_file, sources, targets = pairs
    model, tokenizer = load_translator(checkpoint)
    folder = export_ct2(model, tokenizer, tmp_path / "ct2")
    outputs = {}
    for name, path in (("checkpoint", checkpoint), ("ct2", folder)):
        result = subprocess.run([sys.executable, "-m", "lightning_transformer.cli", "score", str(path), "--source",
                                 str(source_file), "--target", str(target_file)], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        outputs[name] = parse(result.stdout)
    library = score(CheckpointTranslator(model, tokenizer), sources, targets)
    assert len(outputs["checkpoint"]) == len(outputs["ct2"]) == len(sources)
    for (total, per_token), (ct2_total, ct2_per_token), exact in zip(outputs["checkpoint"], outputs["ct2"], library):
        assert per_token == pytest.approx(exact, abs=1e-4)  # printed to 4 decimals
        assert total == pytest.approx(sum(exact), abs=1e-4)
        assert ct2_per_token == pytest.approx(per_token, abs=1e-3) and ct2_total == pytest.approx(total, abs=1e-3)


def test_normalize_prints_the_mean_per_token(pairs, tmp_path):
    checkpoint, source_file, target_file, sources, targets = pairs
    output = tmp_path / "scores.tsv"
    score_main([str(checkpoint), "-s", str(source_file), "-t", str(target_file), "-o", str(output), "--normalize"])
    model, tokenizer = load_translator(checkpoint)
    library = score(CheckpointTranslator(model, tokenizer), sources, targets)
    for (mean, per_token), exact in zip(parse(output.read_text(encoding="utf-8")), library):
        assert mean == pytest.approx(sum(exact) / len(exact), abs=1e-4) and len(per_token) == len(exact)


def test_a_pair_longer_than_the_model_is_refused_by_line(pairs):
    checkpoint, _, _, sources, targets = pairs
    engine = CheckpointTranslator(*load_translator(checkpoint))
    max_len = engine.settings["max_len"]
    too_long = " ".join(["the cat"] * max_len)
    with pytest.raises(ValueError, match=rf"^target line 2 has \d+ tokens, but the model takes at most {max_len - 1} "):
        score(engine, sources[:2], [targets[0], too_long])
