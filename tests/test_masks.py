import torch

from lightning_transformer import create_causal_mask, create_combined_mask, create_padding_mask


def test_padding_mask_shape_and_values():
    seq = torch.tensor([[5, 6, 0, 0], [7, 0, 8, 0]])
    mask = create_padding_mask(seq)
    assert mask.shape == (2, 1, 1, 4) and mask.dtype == torch.bool
    assert mask[:, 0, 0].tolist() == [[True, True, False, False], [True, False, True, False]]


def test_padding_mask_custom_pad_id():
    assert create_padding_mask(torch.tensor([[1, 9, 9]]), pad_token_id=9)[0, 0, 0].tolist() == [True, False, False]


def test_causal_mask_is_lower_triangular():
    mask = create_causal_mask(4)
    assert mask.shape == (4, 4) and mask.dtype == torch.bool
    for i in range(4):
        for j in range(4):
            assert mask[i, j] == (j <= i)


def test_combined_mask_against_explicit_loop():
    torch.manual_seed(0)
    tgt = torch.randint(0, 4, (3, 6))
    tgt[:, 0] = 1
    mask = create_combined_mask(tgt)
    assert mask.shape == (3, 1, 6, 6) and mask.dtype == torch.bool
    for b in range(3):
        for i in range(6):
            for j in range(6):
                assert mask[b, 0, i, j] == (j <= i and tgt[b, j] != 0)


def test_masks_follow_device_of_input():
    seq = torch.tensor([[1, 2, 0]], device="meta")
    assert create_combined_mask(seq).device.type == "meta"
    assert create_causal_mask(3, device="meta").device.type == "meta"
