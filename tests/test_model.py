import copy

import pytest
import torch
from copy_task import CopyTaskDataModule
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from test_losses import CountOps
from torch.utils.data import DataLoader

from lightning_transformer import (
    Seq2SeqTransformer,
    create_combined_mask,
    create_padding_mask,
    greedy_decode,
    noam_schedule,
)
from lightning_transformer.callbacks import TokenThroughput
from lightning_transformer.losses import compute_loss

TINY = dict(src_vocab_size=20, tgt_vocab_size=20, d_model=32, nhead=4, num_encoder_layers=2,
            num_decoder_layers=2, dim_feedforward=64)


def tiny_model(**overrides):
    return Seq2SeqTransformer(**{**TINY, **overrides})


def trainer(tmp_path, **kwargs):
    defaults = dict(default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                    enable_checkpointing=False)
    return Trainer(**{**defaults, **kwargs})


class RecordSteps(Callback):
    """The lr each optimizer step runs with, and each training loss."""

    def __init__(self):
        self.lrs, self.losses = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def test_forward_shapes_and_attributes():
    model = tiny_model(tgt_vocab_size=23)
    src, tgt = torch.randint(3, 20, (2, 7)), torch.randint(3, 20, (2, 5))
    assert model(src, tgt).shape == (2, 5, 23)
    assert model.d_model == 32 and model.tgt_vocab_size == 23
    assert model.hparams.warmup_steps == 4000 and model.hparams.label_smoothing == 0.1


def test_given_masks_equal_built_masks():
    model = tiny_model().eval()
    src, tgt = torch.randint(3, 20, (2, 7)), torch.randint(3, 20, (2, 5))
    src[0, 4:] = 0
    assert torch.equal(model(src, tgt), model(src, tgt, *model.make_masks(src, tgt)))


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_is_causal(norm_first):
    """Changing target token t must not move the logits at positions before t."""
    torch.manual_seed(0)
    model = tiny_model(norm_first=norm_first).eval()
    src, tgt = torch.randint(3, 20, (2, 7)), torch.randint(3, 20, (2, 6))
    changed = tgt.clone()
    changed[:, 3] = (changed[:, 3] + 1) % 17 + 3
    before, after = model(src, tgt), model(src, changed)
    assert torch.allclose(before[:, :3], after[:, :3], atol=1e-6)
    assert not torch.allclose(before[:, 3:], after[:, 3:])


def test_extra_source_padding_changes_nothing():
    model = tiny_model().eval()
    src, tgt = torch.randint(3, 20, (2, 5)), torch.randint(3, 20, (2, 4))
    padded = torch.cat([src, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    assert torch.allclose(model(src, tgt), model(padded, tgt), atol=1e-5)


def test_embedding_sharing_options():
    shared = tiny_model(share_embeddings=True)
    net = shared.transformer
    assert net.src_embed.token.weight is net.tgt_embed.token.weight is net.generator.weight
    untied = tiny_model(tie_output_embeddings=False).transformer
    assert untied.generator.weight is not untied.tgt_embed.token.weight
    with pytest.raises(ValueError, match="joint vocabulary"):
        tiny_model(share_embeddings=True, src_vocab_size=21)


@pytest.mark.parametrize(
    "overrides, message",
    [(dict(nhead=5), "not divisible by nhead"), (dict(warmup_steps=0), "warmup_steps must be positive"),
     (dict(label_smoothing=1.0), "smoothing must be in"), (dict(dropout=1.5), "dropout must be in")],
)
def test_bad_hyperparameters_are_refused_clearly(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(**overrides)


def test_batch_formats_and_errors():
    src, tgt = torch.ones(1, 3, dtype=torch.long), torch.ones(1, 4, dtype=torch.long)
    assert Seq2SeqTransformer.unpack_batch({"src": src, "tgt": tgt})[1] is tgt
    assert Seq2SeqTransformer.unpack_batch([src, tgt])[0] is src
    with pytest.raises(KeyError, match="'tgt'"):
        Seq2SeqTransformer.unpack_batch({"src": src, "target": tgt})
    with pytest.raises(TypeError, match="a batch must be"):
        Seq2SeqTransformer.unpack_batch(src)


def test_a_batch_whose_targets_are_all_padding_is_refused(tmp_path):
    src = torch.tensor([[5, 6, 2]])
    batches = [(src, torch.zeros(1, 4, dtype=torch.long))]
    with pytest.raises(ValueError, match="every target token of this training batch is padding.*pad_token_id=0"):
        trainer(tmp_path, max_steps=1).fit(tiny_model(), DataLoader(batches, batch_size=None))


def test_a_sequence_longer_than_max_len_is_refused_by_name():
    model = tiny_model(max_len=8)
    with pytest.raises(ValueError, match="length 9 exceeds the model's max_len=8.*raise model.max_len"):
        model(torch.ones(1, 9, dtype=torch.long), torch.ones(1, 3, dtype=torch.long))


def test_trainer_runs_the_kth_optimizer_step_at_noam_lr_k(tmp_path):
    record = RecordSteps()
    model = tiny_model(warmup_steps=4, lr_factor=2.0)
    trainer(tmp_path, max_steps=10, callbacks=[record]).fit(model, CopyTaskDataModule())
    expected = [2.0 * 32**-0.5 * min(k**-0.5, k * 4**-1.5) for k in range(1, 11)]
    assert record.lrs == pytest.approx(expected, rel=1e-9)


def test_cosine_schedule_uses_the_trainer_run_length(tmp_path):
    record = RecordSteps()
    model = tiny_model(scheduler="cosine", lr=1e-3, warmup_steps=2, min_lr_ratio=0.1)
    trainer(tmp_path, max_steps=12, callbacks=[record]).fit(model, CopyTaskDataModule())
    assert record.lrs[1] == pytest.approx(1e-3)
    assert record.lrs[6] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # k=7: halfway through the decay
    assert record.lrs[-1] == pytest.approx(1e-4)  # the last step reaches the floor


def test_cosine_run_shorter_than_warmup_warns_and_warms_up(tmp_path):
    record = RecordSteps()
    model = tiny_model(scheduler="cosine", lr=1e-3, warmup_steps=10)
    with pytest.warns(UserWarning, match="inside the 10-step warm-up"):
        trainer(tmp_path, max_steps=3, callbacks=[record]).fit(model, CopyTaskDataModule())
    assert record.lrs == pytest.approx([1e-4, 2e-4, 3e-4])


def test_overfits_one_batch_and_greedy_decoding_copies_it(tmp_path):
    torch.manual_seed(0)
    data = CopyTaskDataModule(num_samples=8, batch_size=8)
    model = tiny_model(d_model=64, dim_feedforward=128, dropout=0.0, label_smoothing=0.0,
                       scheduler="cosine", lr=3e-3, warmup_steps=10)
    trainer(tmp_path, max_steps=150, overfit_batches=1).fit(model, data)
    model.eval()
    src, tgt = data.src, data.tgt
    with torch.no_grad():
        loss = compute_loss(model(src, tgt[:, :-1]), tgt[:, 1:]).item()
    assert loss < 0.05
    decoded = greedy_decode(model, src, max_len=12, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    assert decoded == tgt[:, 1:-1].tolist()


def test_resume_continues_the_same_schedule_and_curve(tmp_path):
    def run(max_steps, ckpt_path=None, callbacks=()):
        torch.manual_seed(0)
        record = RecordSteps()
        model = tiny_model(dropout=0.0, warmup_steps=3)
        data = CopyTaskDataModule(num_samples=64, batch_size=16, shuffle=False)  # 4 steps an epoch
        trainer(tmp_path, max_steps=max_steps, callbacks=[record, *callbacks],
                enable_checkpointing=bool(callbacks)).fit(model, data, ckpt_path=ckpt_path)
        return record

    full = run(8)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    run(4, callbacks=[checkpoint])
    path = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    state = torch.load(path, weights_only=False)
    assert state["lr_schedulers"][0]["last_epoch"] == 4
    resumed = run(8, ckpt_path=path)
    assert resumed.lrs == pytest.approx(full.lrs[4:], rel=1e-12)
    assert resumed.losses == pytest.approx(full.losses[4:], rel=1e-5)


def test_validation_logs_token_weighted_loss_and_perplexity(tmp_path):
    model = tiny_model()
    data = CopyTaskDataModule(num_samples=20, batch_size=8)  # uneven last batch
    metrics = trainer(tmp_path, limit_val_batches=None).validate(model, data, verbose=False)[0]
    model.eval()
    with torch.no_grad():
        nll = compute_loss(model(data.src, data.tgt[:, :-1]), data.tgt[:, 1:])
    assert metrics["val/nll"] == pytest.approx(nll.item(), rel=1e-5)
    assert metrics["val/ppl"] == pytest.approx(nll.exp().item(), rel=1e-5)
    assert metrics["val/loss"] > metrics["val/nll"]


def test_a_subclass_changes_one_hook(tmp_path):
    class PlainCrossEntropy(Seq2SeqTransformer):
        def compute_loss(self, states, tgt_output):
            self.calls = getattr(self, "calls", 0) + 1
            return compute_loss(self.project(states), tgt_output, self.pad_token_id)

    model = PlainCrossEntropy(**TINY)
    trainer(tmp_path, max_steps=2).fit(model, CopyTaskDataModule())
    assert model.calls == 2


def test_predict_step_translates_batches(tmp_path):
    model = tiny_model(max_decode_len_a=0.0, max_decode_len_b=5)
    predictions = trainer(tmp_path).predict(model, CopyTaskDataModule(num_samples=4, batch_size=2))
    assert len(predictions) == 2 and all(len(batch["tokens"]) == 2 for batch in predictions)
    assert all(len(hyp) <= 4 and 2 not in hyp for batch in predictions for hyp in batch["tokens"])


def test_lightning_ema_weight_averaging_fits_the_module(tmp_path):
    from lightning.pytorch.callbacks import EMAWeightAveraging

    model = tiny_model(dropout=0.0, warmup_steps=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ema = EMAWeightAveraging(decay=0.5)
    trainer(tmp_path, max_steps=6, callbacks=[ema]).fit(model, CopyTaskDataModule())
    averaged = ema._average_model.module.state_dict()
    # After fit Lightning swaps the averaged weights into the module itself.
    assert all(torch.equal(averaged[k], v) for k, v in model.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    src, tgt = torch.randint(3, 20, (4, 7)), torch.randint(3, 20, (4, 6))
    src[0, 5:] = 0
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = tiny_model(dropout=0.3, activation_checkpointing=checkpointing).train()
        torch.manual_seed(1)  # same dropout masks, replayed by checkpointing in backward
        tgt_input, tgt_output = model.shift_targets(tgt)
        src_mask, tgt_mask = model.make_masks(src, tgt_input)
        states = model.decode_states(tgt_input, model.encode(src, src_mask), tgt_mask, src_mask)
        loss = model.compute_loss(states, tgt_output)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss, grads), (checkpointed_loss, checkpointed_grads) = results
    assert torch.equal(loss, checkpointed_loss)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, checkpointed_grads))


def test_fused_adam_with_clipping_matches_a_plain_clipped_adam_loop(tmp_path):
    # eps 1e-4, not 1e-9: Adam turns rounding-noise gradients (the key bias has an exact zero
    # gradient) into lr-sized updates, and those would differ between any two implementations.
    torch.manual_seed(0)
    model = tiny_model(dropout=0.0, warmup_steps=2, eps=1e-4)
    reference = copy.deepcopy(model)
    data = CopyTaskDataModule(shuffle=False)
    trainer(tmp_path, max_steps=3, gradient_clip_val=0.05).fit(model, data)
    assert model.trainer.optimizers[0].defaults["fused"]
    optimizer = torch.optim.Adam(reference.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-4, foreach=False)
    scheduler = noam_schedule(optimizer, 32, 2)
    for src, tgt in list(data.train_dataloader())[:3]:
        states = reference.decode_states(tgt[:, :-1], reference.encode(src, create_padding_mask(src)),
                                         create_combined_mask(tgt[:, :-1]), create_padding_mask(src))
        reference.compute_loss(states, tgt[:, 1:]).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    for (name, trained), expected in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(trained, expected, atol=1e-5), name


def test_accumulating_two_uneven_batches_equals_one_batch_of_both(tmp_path):
    # The loss is normalised by the tokens of the whole optimizer step, not averaged per micro-batch:
    # a 2-token and a 12-token batch accumulated must equal one batch holding all 14 tokens.
    torch.manual_seed(0)
    short = torch.tensor([[1, 5, 2, 0, 0, 0, 0], [1, 6, 2, 0, 0, 0, 0]])
    long = torch.tensor([[1, 7, 8, 9, 10, 11, 2], [1, 12, 13, 14, 15, 16, 2]])
    src = torch.tensor([[5, 6, 7, 2], [8, 9, 2, 0]])
    both = [(torch.cat([src, src]), torch.cat([short, long]))]
    models = []
    for batches, accumulate in (([(src, short), (src, long)], 2), (both, 1)):
        torch.manual_seed(0)
        model = tiny_model(dropout=0.0, warmup_steps=1, eps=1e-4)
        run = trainer(tmp_path, max_steps=1, accumulate_grad_batches=accumulate)
        run.fit(model, DataLoader(batches, batch_size=None))
        models.append(model)
    for accumulated, single in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(accumulated, single, atol=1e-5), (accumulated - single).abs().max()


def _numerics_batch(shape: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    if shape == "length_one":  # one source token; the target input is BOS alone
        return torch.tensor([[2], [2]]), torch.tensor([[1, 2], [1, 2]])
    length = 1000 if shape == "very_long" else 12
    src = torch.randint(3, 20, (3, length), generator=generator)
    tgt = torch.cat([torch.ones(3, 1, dtype=torch.long), torch.randint(3, 20, (3, length), generator=generator)], 1)
    if shape == "all_padding_rows":  # a source row and a target row that are padding only
        src[1], tgt[2] = 0, 0
        src[0, 5:], tgt[0, 7:] = 0, 0
    return src, tgt


@pytest.mark.parametrize("shape", ["all_padding_rows", "length_one", "very_long"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_loss_and_gradients_stay_finite_under_every_precision(dtype, shape):
    # Masked scores must be filled with a value the dtype can hold: -1e9 or finfo(fp32).min would
    # overflow to -inf in fp16 and turn a fully masked row into NaN.
    torch.manual_seed(0)
    model = tiny_model(dropout=0.0)
    src, tgt = _numerics_batch(shape)
    tgt_input, tgt_output = model.shift_targets(tgt)
    losses = []
    for precision in (torch.float32, dtype):
        model.zero_grad()
        with torch.autocast("cpu", dtype=precision, enabled=precision != torch.float32):
            src_mask, tgt_mask = model.make_masks(src, tgt_input)
            states = model.decode_states(tgt_input, model.encode(src, src_mask), tgt_mask, src_mask)
            loss = model.compute_loss(states, tgt_output)
        loss.backward()
        losses.append(loss.item())
        assert torch.isfinite(loss) and torch.isfinite(states).all()
        for name, parameter in model.named_parameters():
            assert torch.isfinite(parameter.grad).all(), name
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)  # the 16-bit loss is the fp32 loss, not just finite


def _eval_batch(vocab):
    generator = torch.Generator().manual_seed(0)
    src = torch.randint(3, vocab, (3, 7), generator=generator)
    tgt = torch.randint(3, vocab, (3, 6), generator=generator)
    src[1, 4:], tgt[:, 0], tgt[0, 4:] = 0, 1, 0
    return src, tgt


def _two_pass_values(model, src, tgt):
    tgt_input, tgt_output = model.shift_targets(tgt)
    src_mask, tgt_mask = model.make_masks(src, tgt_input)
    states = model.decode_states(tgt_input, model.encode(src, src_mask), tgt_mask, src_mask)
    return states, tgt_output, model.compute_loss(states, tgt_output), model.compute_nll(states, tgt_output)


def test_evaluation_projects_once_and_keeps_the_two_pass_values():
    torch.manual_seed(0)
    model = tiny_model(src_vocab_size=37, tgt_vocab_size=37).eval()  # 37: no other width of the model
    src, tgt = _eval_batch(37)
    with torch.inference_mode(), CountOps() as ops:  # as Lightning's evaluation loops run it
        model._evaluate((src, tgt))
    states, tgt_output, loss, nll = _two_pass_values(model, src, tgt)
    # The projection of the non-pad targets only: no gradient products.
    assert ops.matmuls(width=37) == [(int((tgt_output != 0).sum()), 37)]
    assert model.eval_loss.compute().item() == pytest.approx(loss.item(), rel=1e-6)
    assert model.eval_nll.compute().item() == pytest.approx(nll.item(), rel=1e-6)
    reference = torch.nn.functional.cross_entropy(model.project(states).double().flatten(0, 1), tgt_output.flatten(),
                                                  ignore_index=0)
    assert model.eval_nll.compute().item() == pytest.approx(reference.item(), rel=1e-6)


@pytest.mark.parametrize("hook", ["compute_loss", "compute_nll"])
def test_evaluation_uses_an_overridden_loss_hook(hook):
    class Shifted(Seq2SeqTransformer):
        def compute_loss(self, states, tgt_output):
            return super().compute_loss(states, tgt_output) + (1.0 if hook == "compute_loss" else 0.0)

        def compute_nll(self, states, tgt_output):
            return super().compute_nll(states, tgt_output) + (2.0 if hook == "compute_nll" else 0.0)

    torch.manual_seed(0)
    model, base = Shifted(**TINY).eval(), tiny_model().eval()
    base.load_state_dict(model.state_dict())
    src, tgt = _eval_batch(20)
    with torch.inference_mode():
        model._evaluate((src, tgt))
        *_, loss, nll = _two_pass_values(base, src, tgt)
    assert model.eval_loss.compute().item() == pytest.approx(loss.item() + (hook == "compute_loss"), rel=1e-6)
    assert model.eval_nll.compute().item() == pytest.approx(nll.item() + 2 * (hook == "compute_nll"), rel=1e-6)


def test_the_step_hooks_read_no_device_value_on_the_host_after_an_epochs_first_batch(tmp_path):
    """A host read (``int``, ``bool``, ``item``) of a device tensor waits for the GPU: the step path has
    none but the all-padding check of each epoch's first batch."""
    model, throughput, reads = tiny_model(), TokenThroughput(), []
    hooks = [(model, name) for name in ("training_step", "backward", "on_before_optimizer_step", "on_train_batch_end")]
    for owner, hook in hooks + [(throughput, "on_train_batch_end")]:
        def counted(*args, _hook=getattr(owner, hook), **kwargs):
            with CountOps() as ops:
                result = _hook(*args, **kwargs)
            reads.extend(name for name, _ in ops.calls if name == "_local_scalar_dense")
            return result
        setattr(owner, hook, counted)
    trainer(tmp_path, max_steps=4, log_every_n_steps=100, callbacks=[throughput]).fit(
        model, CopyTaskDataModule(num_samples=64, batch_size=16))
    assert len(reads) == 1


def test_ddp_has_no_buffers_to_broadcast_and_the_position_table_still_follows_the_model():
    model = tiny_model()
    assert not list(model.buffers())  # DDP broadcasts buffers from rank 0 before every forward
    table = model.transformer.src_embed.positions
    assert torch.equal(model.to(torch.float64).transformer.src_embed.positions, table.double())
    assert "transformer.src_embed.positions" not in model.state_dict()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_training_loss_traces_into_one_graph_for_torch_compile(dtype):
    # fullgraph refuses any graph break: the measured CPU choices (attention kernel, dropout masks)
    # and the fused projection loss must all trace; the eager backend keeps the test to tracing.
    model = tiny_model(dropout=0.1, attention_dropout=0.1, activation_dropout=0.1).train()
    src, tgt = torch.randint(3, 20, (4, 7)), torch.randint(3, 20, (4, 6))

    def loss(src, tgt):
        return model.compute_loss(*model.teacher_force((src, tgt)))  # training_step's shift, masks, forward, loss

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        value = torch.compile(loss, fullgraph=True, backend="eager")(src, tgt)
    value.backward()
    assert torch.isfinite(value) and all(p.grad is not None for p in model.parameters())
