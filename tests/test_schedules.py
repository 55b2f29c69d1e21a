import math

import pytest
import torch

from lightning_transformer import cosine_lambda, cosine_schedule, noam_lambda, noam_schedule
from lightning_transformer.schedules import paper_adam


def noam_formula(k, d_model, warmup, factor=1.0):
    return factor * d_model**-0.5 * min(k**-0.5, k * warmup**-1.5)


@pytest.mark.parametrize("k", [1, 2, 4000, 4001, 40000])
def test_noam_matches_the_paper_formula_at_the_kth_step(k):
    assert noam_lambda(k - 1, d_model=512, warmup_steps=4000) == pytest.approx(noam_formula(k, 512, 4000), rel=1e-12)
    doubled = noam_lambda(k - 1, d_model=512, warmup_steps=4000, factor=2.0)
    assert doubled == pytest.approx(2 * noam_formula(k, 512, 4000))


def test_noam_peaks_at_warmup():
    values = [noam_lambda(s, 512, 4000) for s in range(8000)]
    assert max(range(8000), key=values.__getitem__) == 3999
    assert values[3999] == pytest.approx((512 * 4000) ** -0.5)


def test_noam_scheduler_gives_the_kth_step_lr_k_never_zero_or_raw():
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = noam_schedule(optimizer, d_model=512, warmup_steps=10)
    for k in range(1, 31):
        lr = optimizer.param_groups[0]["lr"]
        assert lr == pytest.approx(noam_formula(k, 512, 10)) and 0 < lr < 1.0
        optimizer.step()
        scheduler.step()


def test_cosine_warms_up_then_decays_to_the_floor():
    assert cosine_lambda(0, warmup_steps=10, total_steps=110) == pytest.approx(0.1)
    assert cosine_lambda(9, warmup_steps=10, total_steps=110) == pytest.approx(1.0)
    assert cosine_lambda(59, warmup_steps=10, total_steps=110, min_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cosine_lambda(109, warmup_steps=10, total_steps=110, min_ratio=0.1) == pytest.approx(0.1)
    assert cosine_lambda(500, warmup_steps=10, total_steps=110, min_ratio=0.1) == pytest.approx(0.1)
    k = 35
    expected = 0.5 * (1 + math.cos(math.pi * (k - 10) / 100))
    assert cosine_lambda(k - 1, warmup_steps=10, total_steps=110) == pytest.approx(expected)


def test_schedules_restore_from_state_dict():
    def build():
        optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
        return optimizer, cosine_schedule(optimizer, warmup_steps=5, total_steps=50)

    optimizer, scheduler = build()
    for _ in range(17):
        optimizer.step()
        scheduler.step()
    restored_optimizer, restored = build()
    restored_optimizer.load_state_dict(optimizer.state_dict())
    restored.load_state_dict(scheduler.state_dict())
    assert restored.last_epoch == 17
    assert restored.get_last_lr() == scheduler.get_last_lr()


@pytest.mark.parametrize("warmup", [0, -5])
def test_non_positive_warmup_is_refused(warmup):
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="warmup_steps must be a positive"):
        noam_schedule(optimizer, 512, warmup)


def test_cosine_needs_total_beyond_warmup():
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="total_steps > warmup_steps"):
        cosine_schedule(optimizer, warmup_steps=10, total_steps=10)


def test_weight_decay_is_decoupled_and_spares_biases_and_norms():
    layer, norm = torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)
    params = list(layer.parameters()) + list(norm.parameters())
    before = [p.detach().clone() for p in params]
    adam = paper_adam(params, lr=0.01, weight_decay=0.1)
    for p in params:
        p.grad = torch.zeros_like(p)
    adam.step()
    # A zero gradient moves Adam by nothing, so what is left is the decay: w * (1 - lr * wd) on the matrix
    # (coupled L2 would have pushed every weight by about lr), nothing on the bias and the LayerNorm.
    torch.testing.assert_close(layer.weight, before[0] * (1 - 0.01 * 0.1))
    for p, b in zip(params[1:], before[1:]):
        torch.testing.assert_close(p, b)


def test_no_weight_decay_is_the_papers_adam():
    adam = paper_adam(torch.nn.Linear(4, 3).parameters(), lr=0.01)
    assert type(adam) is torch.optim.Adam and adam.defaults["betas"] == (0.9, 0.98) and adam.defaults["eps"] == 1e-9


def test_negative_weight_decay_is_refused():
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        paper_adam(torch.nn.Linear(4, 3).parameters(), lr=0.01, weight_decay=-0.1)
