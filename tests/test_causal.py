import pytest
import torch

from lightning_transformer.losses import ProjectedLabelSmoothingLoss
from lightning_transformer.nn.causal import CausalTransformer
from lightning_transformer.nn.masks import create_combined_mask

VOCAB = 40


def tiny(**kwargs) -> CausalTransformer:
    torch.manual_seed(0)
    args = {"d_model": 32, "nhead": 4, "num_layers": 2, "dim_feedforward": 64, "dropout": 0.0, "max_len": 16}
    return CausalTransformer(VOCAB, **{**args, **kwargs}).eval()


@pytest.fixture
def ids():
    torch.manual_seed(1)
    return torch.randint(4, VOCAB, (3, 9))


@pytest.mark.parametrize("norm_first", [False, True])
def test_shapes_and_causality(ids, norm_first):
    model = tiny(norm_first=norm_first)
    logits = model(ids)
    assert logits.shape == (3, 9, VOCAB)
    assert model.states(ids).shape == (3, 9, 32)
    changed = ids.clone()
    changed[:, 5] = (changed[:, 5] + 1 - 4) % (VOCAB - 4) + 4
    moved = (model(changed) - logits).abs().amax(dim=(0, 2))
    assert torch.all(moved[:5] == 0)
    assert torch.all(moved[5:] > 0)


def test_default_mask_is_combined_padding_and_causal(ids):
    model = tiny()
    ids[0, 6:] = 0
    assert torch.equal(model.make_mask(ids), create_combined_mask(ids))
    torch.testing.assert_close(model(ids), model(ids, create_combined_mask(ids)))


@pytest.mark.parametrize("norm_first", [False, True])
def test_cached_steps_equal_full_forward(ids, norm_first):
    model = tiny(norm_first=norm_first)
    ids[1, :3] = 0  # left padding
    ids[2, 7:] = 0  # right padding
    cache = model.init_cache()
    steps = [model(ids[:, :4], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(4, 9)]
    assert model.cached_length(cache) == 9
    torch.testing.assert_close(torch.cat(steps, dim=1), model(ids), atol=1e-5, rtol=1e-5)


def test_padding_rows_finite_and_do_not_leak(ids):
    model = tiny()
    padded = ids.clone()
    padded[0, :4] = 0
    out = model(padded)
    assert out.isfinite().all()
    # Padding keys are never attended: what the pads are replaced by does not matter after them.
    other = padded.clone()
    other[0, 4:] = ids[0, 4:]
    other[0, :4] = 0
    torch.testing.assert_close(out[0, 4:], model(other)[0, 4:])


def test_weight_tying_shares_storage_and_fused_loss_applies(ids):
    tied, untied = tiny(), tiny(tie_output_embeddings=False)
    assert tied.generator.weight.data_ptr() == tied.embed.token.weight.data_ptr()
    assert untied.generator.weight.data_ptr() != untied.embed.token.weight.data_ptr()
    tied.train()
    criterion = ProjectedLabelSmoothingLoss(VOCAB, smoothing=0.1)
    loss = criterion(tied.states(ids[:, :-1]), tied.generator.weight, ids[:, 1:])
    loss.backward()
    assert loss.isfinite() and tied.embed.token.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in tied.parameters())


def test_activation_checkpointing_same_gradients(ids):
    grads = []
    for checkpointing in (False, True):
        model = tiny(activation_checkpointing=checkpointing).train()
        model(ids).square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(plain, recomputed)


def test_errors_beyond_max_len_and_bad_input(ids):
    model = tiny(max_len=8)
    with pytest.raises(ValueError, match="exceed the model's max_len=8"):
        model(ids)
    cache = model.init_cache()
    model(ids[:, :8], cache=cache)
    with pytest.raises(ValueError, match="8 cached plus 1 new"):
        model(ids[:, 8:9], cache=cache)
    with pytest.raises(ValueError, match="add a batch dimension"):
        model(ids[0])
    with pytest.raises(ValueError, match="dropout must be in"):
        tiny(dropout=1.0)
    with pytest.raises(ValueError, match="pad_token_id=50"):
        tiny(pad_token_id=50)
