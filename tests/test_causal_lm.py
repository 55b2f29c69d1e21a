import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from test_model import RecordSteps, trainer
from torch.utils.data import DataLoader

from lightning_transformer import CausalLMTransformer
from lightning_transformer.callbacks import TranslationWriter
from lightning_transformer.cli.generate import continue_prompts
from lightning_transformer.cli.loading import load_model
from lightning_transformer.cli.translate import load_translator
from lightning_transformer.data import LanguageModelDataModule
from lightning_transformer.generation.sampling import generate

ROOT = Path(__file__).resolve().parents[1]
TINY = {"vocab_size": 20, "d_model": 32, "nhead": 4, "num_layers": 2, "dim_feedforward": 64, "max_len": 32}


def tiny_lm(**overrides):
    return CausalLMTransformer(**{**TINY, **overrides})


def random_lines(n: int, length: int, seed: int = 0) -> torch.Tensor:
    """``<s> body </s>`` rows of random ids 3..19 (pad 0, bos 1, eos 2)."""
    body = torch.randint(3, 20, (n, length), generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.ones(n, 1, dtype=torch.long), body, torch.full((n, 1), 2)], dim=1)


def cli(*args, input=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "lightning_transformer.cli", *args], input=input, cwd=cwd,
                          capture_output=True, text=True, timeout=600, check=False)


def test_overfits_one_batch_and_greedy_generation_reproduces_it(tmp_path):
    torch.manual_seed(0)
    lines = random_lines(8, 8)
    lines[:, 1] = torch.arange(3, 11)  # distinct first words: after them each row is determined
    model = tiny_lm(d_model=64, dim_feedforward=128, dropout=0.0, label_smoothing=0.0, scheduler="cosine",
                    lr=3e-3, warmup_steps=10)

    def loss_after_first_word():  # the first word after <s> is a guess among 8, whatever is learnt
        states, targets = model.teacher_force(lines)
        return model.compute_loss(states[:, 1:], targets[:, 1:]).item()

    first = loss_after_first_word()
    trainer(tmp_path, max_steps=150).fit(model, DataLoader([lines], batch_size=None))
    model.eval()
    with torch.no_grad():
        assert loss_after_first_word() < 0.05 < first / 20
        # From <s> and the first word, greedy decoding recites the rest of each row and its EOS.
        assert torch.equal(model.generate(lines[:, :2], max_new_tokens=20, temperature=0), lines)


def test_training_step_equals_an_explicit_float64_label_smoothed_loss():
    torch.manual_seed(0)
    model = tiny_lm(dropout=0.0, label_smoothing=0.1)
    lines = torch.tensor([[1, 5, 6, 7, 8, 2], [1, 9, 10, 2, 0, 0]])
    with pytest.warns(UserWarning, match="not registered"):  # self.log without a Trainer is a no-op
        loss = model.training_step({"tgt": lines}, 0)
    inputs, targets = lines[:, :-1], lines[:, 1:]
    log_probs = model(inputs).double().log_softmax(-1)
    vocab, eps = TINY["vocab_size"], 0.1
    # 1 - eps on the target, eps spread over the V - 2 tokens that are neither the target nor padding.
    q = torch.full(log_probs.shape, eps / (vocab - 2), dtype=torch.float64)
    q[..., 0] = 0.0
    q.scatter_(-1, targets[..., None], 1.0 - eps)
    keep = targets != 0
    expected = -(q * log_probs).sum(-1)[keep].mean()
    assert model.batch_tokens == keep.sum() == 8
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_accumulating_two_uneven_batches_equals_one_batch_of_both(tmp_path):
    # Every token of the optimizer step weighs the same: a 2-token and an 8-token batch accumulated
    # equal one batch of all ten.
    short = torch.tensor([[1, 5, 2, 0, 0, 0], [1, 6, 2, 0, 0, 0]])
    long = torch.tensor([[1, 7, 8, 9, 10, 2], [1, 12, 13, 14, 15, 2]])
    models = []
    for batches, accumulate in (([short, long], 2), ([torch.cat([short, long])], 1)):
        torch.manual_seed(0)
        model = tiny_lm(dropout=0.0, warmup_steps=1, eps=1e-4)
        trainer(tmp_path, max_steps=1, accumulate_grad_batches=accumulate, precision="64-true").fit(
            model, DataLoader(batches, batch_size=None))
        models.append(model)
    for accumulated, single in zip(models[0].parameters(), models[1].parameters()):
        # float32 inside the loss kernel; a mean per micro-batch instead differs by 0.35 here.
        assert torch.allclose(accumulated, single, rtol=0, atol=1e-6), (accumulated - single).abs().max()


def test_resume_continues_the_same_schedule_and_curve(tmp_path):
    batches = list(random_lines(64, 6).split(16))  # 4 steps an epoch

    def run(max_steps, ckpt_path=None, callbacks=()):
        torch.manual_seed(0)
        record = RecordSteps()
        run = trainer(tmp_path, max_steps=max_steps, callbacks=[record, *callbacks],
                      enable_checkpointing=bool(callbacks))
        run.fit(tiny_lm(dropout=0.0, warmup_steps=3), DataLoader(batches, batch_size=None), ckpt_path=ckpt_path)
        return record

    full = run(8)
    run(4, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)])
    resumed = run(8, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt")
    assert resumed.lrs == pytest.approx(full.lrs[4:], rel=1e-12)
    assert resumed.losses == pytest.approx(full.losses[4:], rel=1e-5)


def test_a_batch_without_token_ids_is_refused_by_name():
    with pytest.raises(KeyError, match="lacks 'tgt'"):
        tiny_lm().training_step({"src": torch.ones(2, 3, dtype=torch.long)}, 0)


def test_generate_with_beams_returns_the_best_beam_and_refuses_sampling_arguments():
    torch.manual_seed(0)
    model = tiny_lm(dropout=0.0, beam_size=3, length_penalty=1.0, max_new_tokens=5).eval()
    prompts = torch.tensor([[1, 5, 6], [0, 1, 9]])
    nbest = model.beam_search(prompts, nbest=3)  # the hyperparameters' beam size and length penalty
    assert [len(hyps) for hyps in nbest] == [3, 3]
    assert nbest[0][0].score == pytest.approx(nbest[0][0].log_prob / ((5 + len(nbest[0][0].tokens) + 1) / 6))
    best = model.generate(prompts).tolist()
    expected = [[1, 5, 6, *nbest[0][0].tokens, 2], [1, 9, *nbest[1][0].tokens, 2]]
    assert [[t for t in row if t] for row in best] == expected
    # An override of the hyperparameters: alpha = 0 ranks by log-probability.
    assert all(h.score == h.log_prob for hyps in model.beam_search(prompts, length_penalty=0.0) for h in hyps)
    greedy = generate(model, prompts, 5, 2, temperature=0)
    assert torch.equal(model.generate(prompts, beam_size=1, temperature=0), greedy)
    with pytest.raises(ValueError, match=r"beam search \(beam_size=3\) does not sample"):
        model.generate(prompts, temperature=0.7)


def test_predict_step_continues_each_line_and_skips_filler_batches():
    torch.manual_seed(0)
    model = tiny_lm(dropout=0.0, beam_size=2, max_new_tokens=4).eval()
    lines = torch.tensor([[1, 5, 6, 7, 2], [1, 9, 2, 0, 0]])
    output = model.predict_step({"tgt": lines, "index": torch.tensor([7, 3])}, 0)
    # Each line without its EOS is the prompt; the continuation has no BOS, EOS or padding.
    expected = [hyps[0].tokens for hyps in model.beam_search(torch.tensor([[1, 5, 6, 7], [1, 9, 0, 0]]))]
    assert output == {"tokens": expected, "index": [7, 3]}
    assert all(len(tokens) <= 3 and min(tokens, default=3) >= 3 for tokens in expected)
    assert model.predict_step(lines, 0) == {"tokens": expected, "index": None}
    assert model.predict_step({"tgt": lines, "index": torch.tensor([0, 1]), "filler": True}, 0) == {"tokens": [],
                                                                                                       "index": []}
    greedy = tiny_lm(dropout=0.0, temperature=0.0, max_new_tokens=4).eval()
    greedy.load_state_dict(model.state_dict())
    rows = generate(greedy, torch.tensor([[1, 5, 6, 7], [1, 9, 0, 0]]), 4, 2, temperature=0).tolist()
    continuations = [[t for t in row[n:] if t != 0] for row, n in zip(rows, (4, 2))]
    assert greedy.predict_step(lines, 0)["tokens"] == [c[: c.index(2)] if 2 in c else c for c in continuations]


@pytest.fixture(scope="module")
def lm_checkpoint(small_corpus, tmp_path_factory) -> Path:
    """A tiny LM trained 30 steps on the English side of `small_corpus`, saved with its tokenizer."""
    root = tmp_path_factory.mktemp("lm_run")
    torch.manual_seed(0)
    data = LanguageModelDataModule(str(small_corpus), format="tsv", language="en", vocab_size=300, max_tokens=600,
                                   max_length=64, cache_dir=str(root / "cache"))
    model = CausalLMTransformer(vocab_size=300, d_model=32, nhead=4, num_layers=1, dim_feedforward=64, max_len=64,
                                scheduler="cosine", lr=3e-3, warmup_steps=5, max_new_tokens=8)
    fitted = Trainer(default_root_dir=root, max_steps=30, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
    fitted.fit(model, data)
    fitted.save_checkpoint(root / "lm.ckpt")
    return root / "lm.ckpt"


def test_generate_command_continues_each_prompt(lm_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The cat\nI want\n")
    greedy = cli("generate", str(lm_checkpoint), "--input", str(prompts), "--temperature", "0")
    assert greedy.returncode == 0, greedy.stderr
    lines = greedy.stdout.splitlines()
    assert len(lines) == 2 and any(lines)
    # The command is the library call: same model, tokenizer, prompts and settings, same text.
    model, tokenizer = load_model(lm_checkpoint, CausalLMTransformer)
    assert lines == continue_prompts(model, tokenizer, ["The cat", "I want"], temperature=0)
    sampled = [cli("generate", str(lm_checkpoint), "--temperature", "1.0", "--top-p", "0.9", "--seed", "3",
                   input="The cat\n").stdout for _ in range(2)]
    assert sampled[0] == sampled[1] and sampled[0].strip()


@pytest.mark.parametrize("args, stdin, message", [
    (["nope.ckpt"], "Hi\n", "does not exist"),
    ([], "Hi\n\nthere\n", "prompt line 2 is empty"),
    ([], "", "no prompts"),
    (["--input", "absent.txt"], None, "absent.txt does not exist"),
    (["--top-k", "0"], "Hi\n", "top_k=0 keeps no token"),
    (["--beam-size", "2", "--top-p", "0.9"], "Hi\n", "does not sample"),
])
def test_bad_input_gives_one_line_errors(lm_checkpoint, tmp_path, args, stdin, message):
    checkpoint = [] if args[:1] == ["nope.ckpt"] else [str(lm_checkpoint)]
    result = cli("generate", *checkpoint, *args, input=stdin, cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_generate_command_searches_beams(lm_checkpoint):
    result = cli("generate", str(lm_checkpoint), "--beam-size", "3", "--length-penalty", "1.0",
                 input="The cat\nI want\n")
    assert result.returncode == 0, result.stderr
    model, tokenizer = load_model(lm_checkpoint, CausalLMTransformer)
    assert result.stdout.splitlines() == continue_prompts(model, tokenizer, ["The cat", "I want"], beam_size=3,
                                                          length_penalty=1.0)


def test_predict_subcommand_continues_each_line_in_split_order(lm_checkpoint, small_corpus, tmp_path):
    # The run's checkpoint as `fit` would name its class, with beam_size 2 so that predict is deterministic.
    checkpoint = torch.load(lm_checkpoint, weights_only=False)
    checkpoint["hyper_parameters"].update(beam_size=2, _class_path="lightning_transformer.CausalLMTransformer")
    torch.save(checkpoint, tmp_path / "beam.ckpt")
    output = tmp_path / "continued.txt"
    data = ["--data.init_args.dataset", str(small_corpus), "--data.init_args.format", "tsv",
            "--data.init_args.vocab_size", "300", "--data.init_args.max_tokens", "600",
            "--data.init_args.max_length", "64", "--data.init_args.cache_dir", str(lm_checkpoint.parent / "cache")]
    result = cli("predict", "--config", str(ROOT / "configs/lm_demo.yaml"), "--ckpt_path", str(tmp_path / "beam.ckpt"),
                 *data, "--trainer.plugins", "null", "--trainer.logger", "false", "--trainer.enable_progress_bar",
                 "false", "--trainer.callbacks+=lightning_transformer.callbacks.TranslationWriter",
                 f"--trainer.callbacks.output={output}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # small_corpus has no test split: predict continues the validation lines, each as a prompt.
    lines = (small_corpus / "validation.tsv").read_text(encoding="utf-8").splitlines()[1:]
    model, tokenizer = load_model(tmp_path / "beam.ckpt", CausalLMTransformer)
    expected = continue_prompts(model, tokenizer, [line.split("\t")[0].strip() for line in lines])
    assert output.read_text(encoding="utf-8").splitlines() == expected


def test_prediction_writer_keeps_its_translation_name(tmp_path):
    assert TranslationWriter(str(tmp_path / "out.txt")).output == tmp_path / "out.txt"


def test_a_translation_checkpoint_is_refused(small_run):
    result = cli("generate", str(small_run[0] / "checkpoints" / "last.ckpt"), input="Hi\n")
    assert result.returncode != 0 and "not a CausalLMTransformer subclass" in result.stderr


def test_lm_demo_config_trains_five_steps_and_both_models_checkpoints_rebuild(tmp_path, demo_run):
    result = cli("fit", "--config", str(ROOT / "configs/lm_demo.yaml"), "--trainer.max_steps", "5",
                 "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false",
                 "--trainer.default_root_dir", str(tmp_path), "--data.init_args.vocab_size", "2000", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=5` reached." in result.stderr + result.stdout
    model, _ = load_model(next(tmp_path.rglob("last.ckpt")), CausalLMTransformer)
    assert model.vocab_size == 2000  # the data module's, not the model's default
    # The CLI gives each model only the vocabulary arguments it takes, so both checkpoints rebuild.
    translator, _ = load_translator(next(demo_run.rglob("last.ckpt")))
    assert translator.tgt_vocab_size == 8000 and "vocab_size" not in translator.hparams
