import warnings

import pytest
import torch
from conftest import TINY_MODEL, fit_small, small_data_module
from lightning.pytorch import Callback

from lightning_transformer import precision as plugin_module
from lightning_transformer.checkpoint import load_checkpoint
from lightning_transformer.precision import BF16MasterWeights


def bf16_master_weights():
    """The plugin in bf16 whatever this CPU's bf16 speed, so its mechanics are tested everywhere."""
    return BF16MasterWeights(fall_back_to_float32=False)


class Record(Callback):
    def __init__(self):
        self.losses, self.dtypes = [], set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(trainer.callback_metrics["train/loss"].item())
        self.dtypes |= {p.dtype for p in pl_module.parameters()}


def fit(corpus, root, precision=None, max_steps=40, accumulate=1, **kwargs):
    record = Record()
    master = precision == "master"
    model, _ = fit_small(corpus, root, max_steps, record, gradient_clip_val=1.0, accumulate_grad_batches=accumulate,
                         precision=None if master else precision, plugins=[bf16_master_weights()] if master else None,
                         **kwargs)
    return model, record


def test_the_loss_curve_follows_bf16_mixed(small_corpus, tmp_path):
    _, mixed = fit(small_corpus, tmp_path / "mixed", "bf16-mixed", max_steps=60)
    model, master = fit(small_corpus, tmp_path / "master", "master", max_steps=60)
    assert master.dtypes == {torch.bfloat16}  # the model computed in bf16 throughout
    assert next(model.parameters()).dtype == torch.float32  # and is float32 again after fit
    mixed_losses, master_losses = torch.tensor(mixed.losses), torch.tensor(master.losses)
    assert master_losses[-10:].mean() < 0.7 * master_losses[:5].mean()  # it learns
    assert torch.allclose(master_losses, mixed_losses, rtol=0.03), (master.losses, mixed.losses)


def test_updates_below_bf16_resolution_accumulate_in_the_masters(small_corpus, tmp_path):
    initial = {}

    class Snapshot(Callback):
        def on_train_start(self, trainer, pl_module):
            initial.update({k: v.float().clone() for k, v in pl_module.state_dict().items()})

    def moved(precision):
        master = precision == "master"
        model, _ = fit_small(small_corpus, tmp_path / precision, 10, Snapshot(),
                             model_args={"dropout": 0.0, "lr": 1e-5, "warmup_steps": 1},
                             precision=None if master else precision,
                             plugins=[bf16_master_weights()] if master else None)
        name = "transformer.encoder_layers.0.feed_forward.linear1.weight"
        return (model.state_dict()[name].float() != initial[name]).float().mean().item()

    assert moved("bf16-true") < 0.1  # Adam's steps of ~1e-5 round away in bf16 weights but the smallest
    assert moved("master") > 0.95  # they add up in float32


def test_checkpoints_hold_float32_masters_and_resuming_continues_the_curve(small_corpus, tmp_path):
    _, full = fit(small_corpus, tmp_path / "full", "master", max_steps=30)
    fit(small_corpus, tmp_path / "first", "master", max_steps=15, every_n_steps=15)
    checkpoint = next((tmp_path / "first").glob("*step=15.ckpt"))
    weights = load_checkpoint(checkpoint)["state_dict"]
    matrices = [w for w in weights.values() if w.dim() == 2]
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert any(not torch.equal(w, w.bfloat16().float()) for w in matrices)  # more than bf16 can hold
    _, resumed = fit(small_corpus, tmp_path / "resumed", "master", max_steps=30, ckpt_path=checkpoint)
    assert resumed.losses == pytest.approx(full.losses[15:], abs=1e-6)


def test_accumulated_micro_batches_sum_their_gradients_in_float32(small_corpus, tmp_path):
    seen, stepped = [], []

    class Grads(Callback):
        def __init__(self):
            self.micro = []

        def on_after_backward(self, trainer, pl_module):
            self.micro.append([p.grad.float().clone() for p in pl_module.parameters()])

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            masters = [p.grad.clone() for group in optimizer.param_groups for p in group["params"]]
            seen.append((masters, [sum(grads) for grads in zip(*self.micro)]))
            self.micro = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if not self.micro:  # this micro-batch ended an optimizer step
                params = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
                stepped.append([p.grad.clone() for p in params])

    fit_small(small_corpus, tmp_path / "run", 3, Grads(), model_args={"dropout": 0.0}, accumulate_grad_batches=3,
              plugins=[bf16_master_weights()])
    assert len(seen) == len(stepped) == 3
    for (masters, summed), normalised in zip(seen, stepped):
        assert all(m.dtype == torch.float32 for m in masters)
        assert all(torch.equal(m, s) for m, s in zip(masters, summed))
        # The module divides the masters' gradients by the step's target tokens, as it does the model's.
        tokens = torch.cat([s.flatten() for s in summed]).norm() / torch.cat([n.flatten() for n in normalised]).norm()
        assert tokens > 100 and abs(tokens - tokens.round()) < 1e-2
        assert all(torch.allclose(n * tokens.round(), s, rtol=1e-5, atol=1e-6) for n, s in zip(normalised, summed))


@pytest.mark.parametrize("faster", [True, False])
def test_it_trains_in_float32_and_says_so_where_bf16_is_slower(small_corpus, tmp_path, monkeypatch, faster):
    monkeypatch.setattr(plugin_module, "bf16_is_faster", lambda device, strategy=None: faster)
    record = Record()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = fit_small(small_corpus, tmp_path / "auto", 8, record, plugins=[BF16MasterWeights()])
    said = [str(w.message) for w in caught if "trains in float32" in str(w.message)]
    assert record.dtypes == ({torch.bfloat16} if faster else {torch.float32})
    assert len(said) == (0 if faster else 1) and (faster or "fall_back_to_float32=False" in said[0])
    if not faster:  # exactly the float32 run: no bf16 casts, no master copies
        plain = Record()
        fit_small(small_corpus, tmp_path / "plain", 8, plain)
        assert record.losses == plain.losses


def test_a_model_made_in_bf16_by_init_module_trains_in_float32_where_bf16_is_slower(small_corpus, tmp_path,
                                                                                      monkeypatch):
    from lightning.pytorch import Trainer

    from lightning_transformer import Seq2SeqTransformer

    monkeypatch.setattr(plugin_module, "bf16_is_faster", lambda device, strategy=None: False)
    data = small_data_module(small_corpus, tmp_path / "cache")
    record = Record()
    trainer = Trainer(default_root_dir=tmp_path, max_steps=4, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                      plugins=[BF16MasterWeights()], callbacks=[record])
    with trainer.init_module():
        model = Seq2SeqTransformer(src_vocab_size=data.vocab_size, tgt_vocab_size=data.vocab_size, **TINY_MODEL)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.warns(UserWarning, match="trains in float32"):
        trainer.fit(model, data)
    assert record.dtypes == {torch.float32} and len(record.losses) == 4


def test_bf16_counts_as_faster_on_cpus_that_measure_so_and_on_gpus_with_bf16_tensor_cores(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kwargs: asked.append(kwargs) or False)
    assert not plugin_module.bf16_is_faster(torch.device("cuda", 0)) and asked == [{"including_emulation": False}]
    for measured in (True, False):
        monkeypatch.setattr(plugin_module, "bf16_pays", lambda: measured)
        assert plugin_module.bf16_is_faster(torch.device("cpu")) is measured


def test_every_rank_takes_rank_zeros_answer(monkeypatch):
    monkeypatch.setattr(plugin_module, "bf16_pays", lambda: True)  # this rank measured bf16 faster

    class RankZeroMeasuredSlower:
        def broadcast(self, obj, src=0):
            assert src == 0 and obj is True
            return False

    assert plugin_module.bf16_is_faster(torch.device("cpu"), RankZeroMeasuredSlower()) is False


def test_warnings_name_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Tesla V100")
    monkeypatch.setattr(plugin_module, "cpu_name", lambda: "AMD EPYC")
    assert plugin_module.device_name(torch.device("cuda", 0)) == "GPU (Tesla V100)"
    assert plugin_module.device_name(torch.device("cpu")) == "CPU (AMD EPYC)"
