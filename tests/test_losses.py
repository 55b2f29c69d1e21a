import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_transformer import LabelSmoothingLoss, ProjectedLabelSmoothingLoss, compute_loss, losses


def explicit_smoothed_loss(logits, targets, smoothing, pad=0):
    """The guide's construction in float64: a full (tokens x vocab) target distribution.

    ``0 * log 0`` counts as 0, so a logit of -inf where the distribution is 0 adds nothing.
    """
    logits, targets = logits.double().reshape(-1, logits.size(-1)), targets.reshape(-1)
    vocab = logits.size(-1)
    true_dist = torch.full_like(logits, smoothing / (vocab - 2))
    true_dist.scatter_(1, targets[:, None], 1.0 - smoothing)
    true_dist[:, pad] = 0.0
    keep = targets != pad
    per_token = -torch.where(true_dist > 0, true_dist * logits.log_softmax(-1), 0.0).sum(-1)
    return per_token[keep].sum() / keep.sum()


def make_batch(tokens=(3, 7), vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*tokens, vocab, generator=g) * 3
    targets = torch.randint(1, vocab, tokens, generator=g)
    targets[0, -2:] = 0
    targets[-1, 0] = 0
    return logits, targets


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_label_smoothing_equals_explicit_distribution(smoothing):
    logits, targets = make_batch()
    ours = LabelSmoothingLoss(11, smoothing)(logits, targets)
    assert torch.allclose(ours.double(), explicit_smoothed_loss(logits, targets, smoothing), rtol=1e-6, atol=1e-6)


def test_label_smoothing_gradient_equals_explicit_distribution():
    logits, targets = make_batch()
    leaf = logits.clone().requires_grad_()
    LabelSmoothingLoss(11, 0.1)(leaf, targets).backward()
    reference = logits.double().requires_grad_()
    explicit_smoothed_loss(reference, targets, 0.1).backward()
    assert torch.allclose(leaf.grad.double(), reference.grad, atol=1e-7)
    assert (leaf.grad.reshape(-1, 11)[targets.reshape(-1) == 0] == 0).all()


def test_chunked_kernel_spans_chunks(monkeypatch):
    monkeypatch.setattr(losses, "chunk_elements", lambda device: 4 * 11)  # 4 rows a chunk
    logits, targets = make_batch(tokens=(5, 3))
    leaf = logits.clone().requires_grad_()
    LabelSmoothingLoss(11, 0.2)(leaf, targets).backward()
    reference = logits.double().requires_grad_()
    explicit_smoothed_loss(reference, targets, 0.2).backward()
    assert torch.allclose(leaf.grad.double(), reference.grad, atol=1e-7)


def test_zero_smoothing_equals_compute_loss_and_cross_entropy():
    logits, targets = make_batch()
    expected = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), ignore_index=0)
    assert torch.allclose(LabelSmoothingLoss(11, 0.0)(logits, targets), expected, atol=1e-6)
    assert torch.allclose(compute_loss(logits, targets), expected, atol=1e-6)


def test_padded_batch_equals_sum_of_unpadded_items():
    logits, targets = make_batch(tokens=(4, 6))
    loss = LabelSmoothingLoss(11, 0.1, reduction="sum")
    separately = sum(loss(logits[i][targets[i] != 0], targets[i][targets[i] != 0]) for i in range(4))
    assert torch.allclose(loss(logits, targets), separately, atol=1e-5)


def test_reduction_none_is_zero_at_padding():
    logits, targets = make_batch()
    per_token = LabelSmoothingLoss(11, 0.1, reduction="none")(logits, targets)
    assert per_token.shape == targets.shape
    assert (per_token[targets == 0] == 0).all() and (per_token[targets != 0] > 0).all()


def test_all_padding_targets_give_zero_not_nan():
    logits = torch.randn(2, 3, 11, requires_grad=True)
    targets = torch.zeros(2, 3, dtype=torch.long)
    loss = LabelSmoothingLoss(11, 0.1)(logits, targets)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()
    assert compute_loss(logits, targets).item() == 0.0


def test_padding_logit_masked_to_minus_inf_gives_the_finite_reference():
    logits, targets = make_batch()
    logits[..., 0] = float("-inf")  # a model that never predicts padding
    leaf = logits.clone().requires_grad_()
    loss = LabelSmoothingLoss(11, 0.1)(leaf, targets)
    loss.backward()
    reference = logits.double().requires_grad_()
    expected = explicit_smoothed_loss(reference, targets, 0.1)
    expected.backward()
    assert torch.isfinite(loss) and torch.allclose(loss.double(), expected, atol=1e-6)
    assert torch.isfinite(leaf.grad).all() and (leaf.grad[..., 0] == 0).all()
    assert torch.allclose(leaf.grad[..., 1:].double(), reference.grad[..., 1:], atol=1e-7)


def test_bfloat16_logits_match_float32():
    logits, targets = make_batch()
    low = logits.bfloat16().requires_grad_()
    loss = LabelSmoothingLoss(11, 0.1)(low, targets)
    loss.backward()
    assert low.grad.dtype == torch.bfloat16
    assert torch.allclose(loss, LabelSmoothingLoss(11, 0.1)(low.detach().float(), targets), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(vocab_size=2), "vocab_size must be > 2"),
        (dict(vocab_size=10, smoothing=1.0), r"smoothing must be in \[0, 1\)"),
        (dict(vocab_size=10, smoothing=-0.1), r"smoothing must be in \[0, 1\)"),
        (dict(vocab_size=10, pad_token_id=10), "outside the vocabulary"),
        (dict(vocab_size=10, reduction="avg"), "reduction must be"),
    ],
)
def test_bad_arguments_are_refused_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LabelSmoothingLoss(**kwargs)


def test_vocabulary_mismatch_is_refused_clearly():
    with pytest.raises(ValueError, match="vocab_size=12"):
        LabelSmoothingLoss(12)(torch.randn(2, 11), torch.ones(2, dtype=torch.long))


def make_states(tokens=(4, 6), width=8, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(*tokens, width, generator=g)
    weight = torch.randn(vocab, width, generator=g)
    return states, weight, make_batch(tokens, vocab, seed)[1]


@pytest.mark.parametrize("padded_rows", ["dropped", "zeroed"])
@pytest.mark.parametrize("chunk_rows", [3, 1000])
def test_projected_loss_equals_projection_then_explicit_distribution(monkeypatch, chunk_rows, padded_rows):
    monkeypatch.setattr(losses, "chunk_elements", lambda device: chunk_rows * 11)
    if padded_rows == "zeroed":  # the path of accelerators and torch.compile, taken here on a CPU
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    states, weight, targets = make_states()
    leaves = states.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, nll = ProjectedLabelSmoothingLoss(11, 0.1)(*leaves, targets, return_nll=True)
    loss.backward()
    ref_states, ref_weight = states.double().requires_grad_(), weight.double().requires_grad_()
    ref_logits = ref_states @ ref_weight.T
    reference = explicit_smoothed_loss(ref_logits, targets, 0.1)
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    assert nll.item() == pytest.approx(compute_loss(ref_logits, targets).item(), rel=1e-6)
    assert torch.allclose(leaves[0].grad.double(), ref_states.grad, atol=1e-6)
    assert torch.allclose(leaves[1].grad.double(), ref_weight.grad, atol=1e-6)
    assert not nll.requires_grad


def test_projected_loss_under_bf16_autocast_matches_unfused():
    states, weight, targets = make_states(tokens=(16, 9), width=32, vocab=50)
    grads = []
    for fused in (True, False):
        leaves = states.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                loss = ProjectedLabelSmoothingLoss(50, 0.1)(*leaves, targets)
            else:
                loss = LabelSmoothingLoss(50, 0.1)(leaves[0] @ leaves[1].T, targets)
        loss.backward()
        grads.append((loss.detach(), *(leaf.grad for leaf in leaves)))
    (fused_loss, fused_gs, fused_gw), (loss, gs, gw) = grads
    assert fused_gs.dtype == fused_gw.dtype == torch.float32
    # bf16 logits carry ~3 significant digits; the two paths round different matmul blocks.
    assert fused_loss.item() == pytest.approx(loss.item(), rel=5e-3)
    assert torch.allclose(fused_gs, gs, rtol=0.02, atol=0.02 * gs.abs().max().item())
    assert torch.allclose(fused_gw, gw, rtol=0.02, atol=0.02 * gw.abs().max().item())


def test_projected_loss_ignores_padding_and_all_padding_is_zero():
    states, weight, targets = make_states()
    leaf = states.clone().requires_grad_()
    loss = ProjectedLabelSmoothingLoss(11, 0.1, reduction="sum")
    loss(leaf, weight, targets).backward()
    assert (leaf.grad[targets == 0] == 0).all() and (leaf.grad[targets != 0] != 0).any()
    zero = ProjectedLabelSmoothingLoss(11, 0.1)(leaf, weight, torch.zeros_like(targets))
    assert zero.item() == 0.0


def test_projected_loss_refuses_mismatched_projection_and_per_token_reduction():
    states, weight, targets = make_states()
    with pytest.raises(ValueError, match="same tokenizer"):
        ProjectedLabelSmoothingLoss(12)(states, weight, targets)
    with pytest.raises(ValueError, match="reduction='mean' or 'sum'"):
        ProjectedLabelSmoothingLoss(11, reduction="none")


class CountOps(TorchDispatchMode):
    """Records every aten operator run inside it, with its tensor arguments' and its output's shapes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shapes = [tuple(a.shape) for a in (*args, out) if isinstance(a, torch.Tensor)]
        self.calls.append((func.overloadpacket.__name__, shapes))
        return out

    def matmuls(self, width=None):
        """Output shape of each matrix product (of those touching a dimension ``width``, if given).

        ``linear`` counts too: inference mode runs it undecomposed.
        """
        return [shapes[-1] for name, shapes in self.calls if name in ("mm", "addmm", "addmm_", "bmm", "linear")
                and (width is None or any(width in shape for shape in shapes))]


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_projected_loss_without_grad_only_projects(mode):
    states, weight, targets = make_states()
    weight.requires_grad_()  # a parameter requires grad even where no gradient is wanted
    with mode(), CountOps() as ops:
        loss, nll = ProjectedLabelSmoothingLoss(11, 0.1)(states, weight, targets, return_nll=True)
    assert ops.matmuls() == [(int((targets != 0).sum()), 11)]  # the projection of non-pad rows, no gradient product
    with_grad = ProjectedLabelSmoothingLoss(11, 0.1)(states, weight, targets, return_nll=True)
    # The same values as with gradients, to float32 rounding (the two paths reduce in different orders on some CPUs).
    assert loss.item() == pytest.approx(with_grad[0].item(), rel=1e-6)
    assert nll.item() == pytest.approx(with_grad[1].item(), rel=1e-6)
    logits = states.double() @ weight.double().T
    assert loss.item() == pytest.approx(explicit_smoothed_loss(logits, targets, 0.1).item(), rel=1e-6)
    assert nll.item() == pytest.approx(compute_loss(logits, targets).item(), rel=1e-6)


def test_loss_operators_per_micro_batch_at_the_base_config():
    # Base config: d_model 512, a 37k vocabulary, ~25k target tokens a micro-batch. Meta tensors
    # run no arithmetic and get the accelerator policy, as CUDA does.
    assert losses.chunk_elements(torch.device("meta")) == losses.chunk_elements(torch.device("cuda"))
    assert losses.chunk_elements(torch.device("cuda")) * 4 <= 2**28  # a float32 scratch buffer: 256 MiB at most
    states = torch.empty(25000, 512, device="meta", requires_grad=True)
    weight = torch.empty(37000, 512, device="meta", requires_grad=True)
    targets = torch.empty(25000, dtype=torch.long, device="meta")
    with CountOps() as ops:
        ProjectedLabelSmoothingLoss(37000, 0.1)(states, weight, targets).backward()
    # Each operator is a kernel launch (~5-10 us) on a GPU; ~1000 of them cost a few ms a step.
    assert len(ops.calls) < 1000
