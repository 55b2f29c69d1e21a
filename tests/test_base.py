"""``TokenLevelModule``: a plain mean-loss step usable anywhere, and hooks that hold on every path."""

import copy
from types import SimpleNamespace

import pytest
import torch
from copy_task import CopyTaskDataModule
from lightning.fabric import Fabric
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader

from lightning_transformer import LabelSmoothingLoss, Seq2SeqTransformer, greedy_decode
from lightning_transformer.callbacks import TokenThroughput, TranslationMetrics
from lightning_transformer.modules import TokenLevelModule

TINY = dict(src_vocab_size=20, tgt_vocab_size=20, d_model=32, nhead=4, num_encoder_layers=2,
            num_decoder_layers=2, dim_feedforward=64, dropout=0.0)


def batch():
    generator = torch.Generator().manual_seed(0)
    src, tgt = torch.randint(3, 20, (3, 7), generator=generator), torch.randint(3, 20, (3, 6), generator=generator)
    src[1, 4:], tgt[:, 0], tgt[0, 4:] = 0, 1, 0
    return src, tgt


def trainer(tmp_path, **kwargs):
    defaults = dict(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    num_sanity_val_steps=0, limit_val_batches=0, enable_checkpointing=False)
    return Trainer(**{**defaults, **kwargs})


def test_seq2seq_is_a_token_level_module():
    assert issubclass(Seq2SeqTransformer, TokenLevelModule)


def test_training_step_returns_the_mean_loss_without_a_trainer_and_under_fabric():
    torch.manual_seed(0)
    model = Seq2SeqTransformer(**TINY)
    states, targets = model.teacher_force(batch())
    expected = model.compute_loss(states, targets)
    with pytest.warns(UserWarning, match="self.log"):  # Lightning's notice; the step itself runs
        assert torch.allclose(model.training_step(batch(), 0), expected)
    fabric = Fabric(accelerator="cpu", devices=1)
    wrapped = fabric.setup(model)
    loss = wrapped.training_step(batch(), 0)
    fabric.backward(loss)
    assert torch.allclose(loss, expected) and model.transformer.generator.weight.grad is not None


def test_an_auxiliary_loss_added_to_the_step_gets_exactly_its_gradient(tmp_path):
    class WithAux(Seq2SeqTransformer):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) + self.aux()

        def aux(self):
            return 0.3 * self.transformer.generator.weight.pow(2).mean()

    torch.manual_seed(0)
    model = WithAux(**TINY)
    reference = copy.deepcopy(model)
    trainer(tmp_path, max_steps=1).fit(model, DataLoader([batch()], batch_size=None))
    states, targets = reference.teacher_force(batch())
    (reference.compute_loss(states, targets) + reference.aux()).backward()
    for (name, trained), expected in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(trained.grad, expected.grad, atol=1e-6), name


def test_manual_optimisation_and_deepspeed_are_refused_at_setup(tmp_path):
    class Manual(Seq2SeqTransformer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="automatic optimisation; keep automatic_optimization=True"):
        trainer(tmp_path, max_steps=1).fit(Manual(**TINY), DataLoader([batch()], batch_size=None))
    model = Seq2SeqTransformer(**TINY)
    model.trainer = SimpleNamespace(strategy=DeepSpeedStrategy.__new__(DeepSpeedStrategy))  # needs no deepspeed
    with pytest.raises(ValueError, match="cannot run under DeepSpeed.*strategy='ddp' or 'fsdp'"):
        model.setup("fit")


class Tempered(Seq2SeqTransformer):
    def project(self, states):
        return super().project(states) * 2.0


def test_an_overridden_projection_changes_the_training_and_evaluation_loss():
    torch.manual_seed(0)
    model, plain = Tempered(**TINY), Seq2SeqTransformer(**TINY)
    plain.load_state_dict(model.state_dict())
    states, targets = model.teacher_force(batch())
    expected = LabelSmoothingLoss(20, 0.1, 0)(model.transformer.generator(states) * 2.0, targets)
    with pytest.warns(UserWarning, match="self.log"):
        loss = model.training_step(batch(), 0)
    with pytest.warns(UserWarning, match="self.log"):
        plain_loss = plain.training_step(batch(), 0)
    assert torch.allclose(loss, expected) and not torch.allclose(loss, plain_loss)
    with torch.inference_mode():
        model._evaluate(batch())
    assert model.eval_loss.compute().item() == pytest.approx(expected.item(), rel=1e-5)
    logits = (model.transformer.generator(states) * 2.0).detach()
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=0)
    assert model.eval_nll.compute().item() == pytest.approx(nll.item(), rel=1e-5)


class FiveIsPadding(Seq2SeqTransformer):
    """Masks source token 5 as if it were padding."""

    def make_masks(self, src, tgt_input):
        src_mask, tgt_mask = super().make_masks(src, tgt_input)
        return src_mask & (src != 5)[:, None, None, :], tgt_mask


def test_decoding_builds_its_masks_through_make_masks():
    src = torch.tensor([[7, 5, 9, 5, 2], [8, 6, 5, 2, 0]])
    padded = src.masked_fill(src == 5, 0)
    scores = {}
    for cls in (FiveIsPadding, Seq2SeqTransformer):
        torch.manual_seed(0)
        model = cls(**TINY, max_decode_len_a=0.0, max_decode_len_b=5).eval()
        scores[cls] = [[h[0].score for h in model.translate_ids(s, beam_size=2)] for s in (src, padded)]
        if cls is FiveIsPadding:
            greedy = [greedy_decode(model, s, 6, 0, 1, 2) for s in (src, padded)]
            assert greedy[0] == greedy[1]
    assert scores[FiveIsPadding][0] == pytest.approx(scores[FiveIsPadding][1], abs=1e-5)
    assert scores[Seq2SeqTransformer][0] != pytest.approx(scores[Seq2SeqTransformer][1], abs=1e-5)


def test_translation_metrics_read_batches_through_unpack_batch():
    class OwnBatches(Seq2SeqTransformer):
        @staticmethod
        def unpack_batch(batch, need_target=True):
            return batch["source"], batch.get("target")

    model = OwnBatches(**TINY, max_decode_len_a=0.0, max_decode_len_b=3).eval()
    tokenizer = SimpleNamespace(decode=lambda ids: " ".join(map(str, ids)))
    fake = SimpleNamespace(sanity_checking=False, state=SimpleNamespace(fn=TrainerFn.VALIDATING),
                           datamodule=SimpleNamespace(tokenizer=tokenizer))
    src, tgt = batch()
    metrics = TranslationMetrics(beam_size=2)
    own_batch = {"source": src, "target": tgt, "index": torch.tensor([4, 5, 6])}
    metrics.on_validation_batch_end(fake, model, None, own_batch, 0)
    assert sorted(metrics._outputs) == [4, 5, 6]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lr_and_throughput_are_logged_by_callbacks(tmp_path, weight_decay):
    torch.manual_seed(0)
    model = Seq2SeqTransformer(**TINY, warmup_steps=4, weight_decay=weight_decay)
    monitor = LearningRateMonitor(logging_interval="step")
    run = trainer(tmp_path, max_steps=3, log_every_n_steps=1, logger=CSVLogger(tmp_path),
                  callbacks=[monitor, TokenThroughput()])
    run.fit(model, CopyTaskDataModule())
    noam = [32**-0.5 * min(k**-0.5, k * 4**-1.5) for k in (1, 2, 3)]
    assert monitor.lrs["train/lr"] == pytest.approx(noam)
    assert run.callback_metrics["train/tokens_per_sec"] > 0
