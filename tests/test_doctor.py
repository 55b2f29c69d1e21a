"""TrainingDoctor: each failure is induced on a tiny model and must be caught with its remedy."""

import warnings

import pytest
import torch
from copy_task import CopyTaskDataModule
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_transformer import Seq2SeqTransformer, TrainingDoctor, create_combined_mask, create_padding_mask
from lightning_transformer.callbacks.doctor import TrainingDiverged, TrainingProblem, TrainingWarning

TINY = dict(src_vocab_size=20, tgt_vocab_size=20, d_model=32, nhead=4, num_encoder_layers=2,
            num_decoder_layers=2, dim_feedforward=64)
HEALTHY = dict(scheduler="cosine", lr=3e-3, warmup_steps=5)
SHORT = {**HEALTHY, "warmup_steps": 1}  # for 2-step runs: the cosine decay starts


def fit(model, doctor=None, max_steps=30, callbacks=(), **kwargs):
    seed_everything(0)
    trainer = Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                      callbacks=[doctor or TrainingDoctor(), *callbacks], **kwargs)
    trainer.fit(model, CopyTaskDataModule())
    return trainer


class NanLossAt(Seq2SeqTransformer):
    def __init__(self, nan_step, **kwargs):
        super().__init__(**kwargs)
        self.nan_step = nan_step

    def compute_loss(self, states, tgt_output):
        loss = super().compute_loss(states, tgt_output)
        return loss * float("nan") if self.global_step == self.nan_step else loss


class DetachedEncoder(Seq2SeqTransformer):
    def encode(self, src, src_mask):
        return super().encode(src, src_mask).detach()


class NonCausalTargetMask(Seq2SeqTransformer):
    def make_masks(self, src, tgt_input):
        return create_padding_mask(src, self.pad_token_id), create_padding_mask(tgt_input, self.pad_token_id)


class NoSourceMask(Seq2SeqTransformer):
    def make_masks(self, src, tgt_input):
        return None, create_combined_mask(tgt_input, self.pad_token_id)


class SnapshotWeights(Callback):
    """The weights before each batch, and the train/eval mode each backward runs in."""

    def __init__(self):
        self.weights, self.modes = None, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights = [p.detach().clone() for p in pl_module.parameters()]

    def on_before_backward(self, trainer, pl_module, loss):
        self.modes.append(all(m.training for m in pl_module.modules()))


def test_healthy_run_raises_and_warns_nothing():
    torch.manual_seed(0)
    snapshot = SnapshotWeights()
    # stuck_steps inside the run so that every check is exercised; the copy task's loss drops ~15% by then.
    doctor = TrainingDoctor(stuck_steps=25, window=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainingWarning)
        trainer = fit(Seq2SeqTransformer(**TINY, **HEALTHY), doctor, callbacks=[snapshot])
    assert trainer.global_step == 30
    assert doctor._checked_masks and doctor._checked_grads and doctor._checked_stuck and not doctor._warned
    assert all(snapshot.modes), "the mask probe must restore train mode"


def test_nan_loss_raises_before_the_weights_change():
    torch.manual_seed(0)
    snapshot = SnapshotWeights()
    model = NanLossAt(3, **TINY, **HEALTHY)
    initial = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 3.*gradient_clip_val.*bf16-mixed"):
        fit(model, callbacks=[snapshot])
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), initial))  # steps 0-2 were applied
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), snapshot.weights))  # step 3 was not


def test_exploding_loss_warns():
    torch.manual_seed(0)
    # Noam peaking at lr 1.2: the loss falls for ~10 steps of warm-up, then climbs past 10x.
    model = Seq2SeqTransformer(**TINY, scheduler="noam", lr_factor=30.0, warmup_steps=20)
    with pytest.warns(TrainingWarning, match=r"loss rose to .* its lowest .* diverging. Lower the learning rate"):
        fit(model, TrainingDoctor(max_lr=float("inf")))


@pytest.mark.parametrize("loss_key", ["train/loss", None])  # None: the loss handed to backward
def test_stuck_loss_warns(loss_key):
    torch.manual_seed(0)
    model = Seq2SeqTransformer(**TINY, scheduler="cosine", lr=1e-9, warmup_steps=5)
    with pytest.warns(TrainingWarning, match=r"after 20 steps, within 5% .* not learning. Check the learning rate"):
        fit(model, TrainingDoctor(stuck_steps=20, window=5, loss_key=loss_key), max_steps=25)


class RecordOverflow(Callback):
    def __init__(self):
        self.overflows = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.overflows.append(any(not p.grad.isfinite().all() for p in pl_module.parameters()))


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")  # the skipped steps
def test_fp16_gradient_overflow_is_not_flagged():
    """The GradScaler's first steps overflow and are skipped: normal, not a divergence."""
    torch.manual_seed(0)
    overflow = RecordOverflow()
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainingWarning)
        fit(Seq2SeqTransformer(**TINY, **HEALTHY), TrainingDoctor(stuck_steps=25, window=5), callbacks=[overflow],
            plugins=[MixedPrecision("16-mixed", "cpu")])
    assert overflow.overflows[0] and not overflow.overflows[-1]


def test_parameters_without_gradient_raise():
    torch.manual_seed(0)
    model = DetachedEncoder(**TINY, **HEALTHY)
    with pytest.raises(TrainingProblem, match=r"got no gradient .*transformer\.src_embed.* and \d+ more.*detaches"):
        fit(model, accumulate_grad_batches=2)
    assert model.global_step == 0


def test_frozen_parameters_are_not_reported():
    torch.manual_seed(0)
    model = Seq2SeqTransformer(**TINY, **SHORT)
    model.transformer.encoder_layers.requires_grad_(False)
    fit(model, max_steps=2)


def test_zero_learning_rate_raises():
    torch.manual_seed(0)
    model = Seq2SeqTransformer(**TINY, scheduler="noam", lr_factor=0.0, warmup_steps=5)
    with pytest.raises(TrainingProblem, match=r"learning rate has been 0 .*lr_factor"):
        fit(model)
    assert model.global_step == 1


def test_large_learning_rate_warns():
    torch.manual_seed(0)
    model = Seq2SeqTransformer(**TINY, **SHORT)
    with pytest.warns(TrainingWarning, match=r"learning rate 0.003 at step 0 exceeds max_lr=0.0001"):
        fit(model, TrainingDoctor(max_lr=1e-4), max_steps=2)


def test_non_causal_target_mask_raises():
    torch.manual_seed(0)
    with pytest.raises(TrainingProblem, match=r"sees future tokens. Check make_masks: the target mask must be causal"):
        fit(NonCausalTargetMask(**TINY, **HEALTHY))


def test_unmasked_source_padding_raises():
    torch.manual_seed(0)
    with pytest.raises(TrainingProblem, match=r"appending padding to the source changed the outputs"):
        fit(NoSourceMask(**TINY, **HEALTHY))


def test_mask_probe_skips_other_modules():
    doctor = TrainingDoctor()
    doctor.on_train_batch_start(None, LightningModule(), None, 0)
    assert doctor._checked_masks


def test_mask_probe_can_be_disabled():
    torch.manual_seed(0)
    fit(NonCausalTargetMask(**TINY, **SHORT), TrainingDoctor(check_masks=False), max_steps=2)


def test_invalid_thresholds_are_refused():
    with pytest.raises(ValueError, match="explode_factor > 1"):
        TrainingDoctor(explode_factor=0.5)


@pytest.mark.parametrize(("precision", "bf16_pays", "warned"),
                         [("bf16-mixed", False, True), ("bf16-true", False, True), ("bf16-mixed", True, False),
                          ("32-true", False, False), ("master weights in bf16", False, False)])
def test_bf16_on_a_cpu_that_emulates_it_warns(monkeypatch, precision, bf16_pays, warned):
    from lightning_transformer import precision as plugin_module
    from lightning_transformer.precision import BF16MasterWeights

    monkeypatch.setattr(plugin_module, "bf16_pays", lambda: bf16_pays)  # this CPU's cached measurement
    # An explicit bf16 request of the plugin is left alone: it measured, and was told to use bf16 anyway.
    plugin = precision == "master weights in bf16"
    kwargs = {"plugins": [BF16MasterWeights(fall_back_to_float32=False)]} if plugin else {"precision": precision}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(Seq2SeqTransformer(**TINY, **SHORT), max_steps=2, **kwargs)
    said = [str(w.message) for w in caught if w.category is TrainingWarning and "emulates" in str(w.message)]
    assert len(said) == warned and (not warned or "32-true" in said[0] and "BF16MasterWeights" in said[0])
