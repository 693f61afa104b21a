"""Quantizer math: error bounds, grouping, symmetry, STE, activation fake-quant."""

import pytest
import torch

from quantcli.errors import SpecError
from quantcli.quant import (
    QuantSpec,
    choose_qparams,
    compute_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_activation,
    quantize,
    quantize_weight,
    round_ste,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group", [16, 64, -1])
def test_rtn_error_at_most_half_a_step(bits, sym, group):
    torch.manual_seed(bits)
    w = torch.randn(32, 64) * torch.rand(32, 1) * 3
    spec = QuantSpec(wbits=bits, group=group, sym=sym)
    qw = quantize_weight(w, spec)
    g = spec.group_for(64)
    step = qw.scale.repeat_interleave(g, dim=1)
    assert qw.codes.dtype == torch.uint8
    assert int(qw.codes.max()) <= 2**bits - 1
    assert torch.all((qw.dequantize() - w).abs() <= step / 2 + 1e-6)


def test_group_minus_one_equals_per_channel():
    w = torch.randn(16, 48)
    per_channel = quantize_weight(w, QuantSpec(4, -1))
    whole_row = quantize_weight(w, QuantSpec(4, 48))
    assert per_channel.scale.shape == (16, 1)
    assert torch.equal(per_channel.codes, whole_row.codes)
    assert torch.equal(per_channel.dequantize(), whole_row.dequantize())


def test_symmetric_zero_is_midpoint_and_codes_signed_range():
    w = torch.randn(8, 32)
    qw = quantize_weight(w, QuantSpec(4, 32, sym=True))
    assert torch.all(qw.zero == 8)
    signed = qw.codes.int() - 8
    assert signed.min() >= -8 and signed.max() <= 7


def test_clip_shrinks_the_range():
    w = torch.randn(8, 32)
    full, _ = compute_qparams(w, 4, 32, False)
    clipped, _ = compute_qparams(w, 4, 32, False, clip=torch.full((8, 1), 0.5))
    assert torch.allclose(clipped, full * 0.5)


def test_asymmetric_clip_with_two_ends_hand_computed():
    """2 bits, one group [-4, -1, 1, 6], clip_hi 0.5, clip_lo 0.25: range [-1, 3], scale 4/3,
    zero round(0.75) = 1, codes clamp(round(w / scale) + 1, 0, 3) = [0, 0, 2, 3]."""
    w = torch.tensor([[-4.0, -1.0, 1.0, 6.0]])
    scale, zero = compute_qparams(w, 2, 4, False, clip=torch.tensor([[0.5]]), clip_lo=torch.tensor([[0.25]]))
    assert torch.allclose(scale, torch.tensor([[4 / 3]])) and torch.equal(zero, torch.tensor([[1.0]]))
    codes = quantize(w, scale, zero, 2, 4)
    assert codes.tolist() == [[0, 0, 2, 3]]
    assert torch.allclose(dequantize(codes, scale, zero, 4), torch.tensor([[-4 / 3, -4 / 3, 4 / 3, 8 / 3]]))
    # one ratio for both ends is the old single-clip behaviour: [-2, 3] → scale 5/3, zero round(1.2) = 1
    scale1, zero1 = compute_qparams(w, 2, 4, False, clip=torch.tensor([[0.5]]))
    assert torch.allclose(scale1, torch.tensor([[5 / 3]])) and torch.equal(zero1, torch.tensor([[1.0]]))


def test_symmetric_clip_hand_computed():
    """3 bits symmetric, [-4, -1, 1, 6], clip 0.5: max(3, 2) = 3, scale 3 / 3.5, zero 4."""
    w = torch.tensor([[-4.0, -1.0, 1.0, 6.0]])
    scale, zero = compute_qparams(w, 3, 4, True, clip=torch.tensor([[0.5]]))
    assert torch.allclose(scale, torch.tensor([[6 / 7]])) and torch.equal(zero, torch.tensor([[4.0]]))
    assert quantize(w, scale, zero, 3, 4).tolist() == [[0, 3, 5, 7]]


def test_weights_and_activations_share_one_formula():
    """Per-token activation fake-quant is choose_qparams over the last dim, the same as a weight row
    taken as one group (a [tokens, C] activation read as a [C]-grouped weight)."""
    x = torch.randn(6, 32) * 3
    scale, zero = choose_qparams(x, 4, False)
    w_scale, w_zero = compute_qparams(x, 4, 32, False)
    assert torch.equal(scale, w_scale[:, 0]) and torch.equal(zero, w_zero[:, 0])
    assert torch.allclose(fake_quantize_activation(x, 4), quantize_weight(x, QuantSpec(4, 32)).dequantize(), atol=1e-6)


def test_clip_ratios_are_differentiable_without_in_place_ops():
    w = torch.randn(4, 32)
    hi = torch.full((4, 2), 0.9, requires_grad=True)
    lo = torch.full((4, 2), 0.8, requires_grad=True)
    scale, zero = compute_qparams(w, 3, 16, False, clip=hi, clip_lo=lo, ste=True)
    fake_quantize(w, scale, zero, 3, 16).sub(w).pow(2).sum().backward()
    assert hi.grad.abs().sum() > 0 and lo.grad.abs().sum() > 0


def test_g_idx_maps_columns_to_permuted_groups():
    """``g_idx`` (act order without static groups) puts column j in group g_idx[j]: quantizing with it
    equals quantizing the columns sorted by group contiguously, then putting them back."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 16, generator=gen) * torch.linspace(0.1, 5, 16)  # groups differ in range
    g_idx = torch.tensor([2, 0, 3, 1, 1, 0, 2, 3, 0, 3, 1, 2, 3, 0, 2, 1], dtype=torch.int32)
    order = torch.argsort(g_idx, stable=True)  # columns of group 0, then group 1, …
    scale, zero = compute_qparams(w[:, order], 3, 4, False)
    contiguous = quantize(w[:, order], scale, zero, 3, 4)
    codes = quantize(w, scale, zero, 3, 4, g_idx)
    inverse = torch.argsort(order)
    assert torch.equal(codes, contiguous[:, inverse])
    back = dequantize(codes, scale, zero, 4, g_idx)
    assert torch.equal(back, dequantize(contiguous, scale, zero, 4)[:, inverse])
    step = scale[:, g_idx.long()]
    assert torch.all((back - w).abs() <= step / 2 + 1e-6)
    assert not torch.equal(back, dequantize(codes, scale, zero, 4))  # without g_idx the groups are wrong


def test_ste_gradient_is_identity():
    x = torch.linspace(-3, 3, 101, requires_grad=True)
    round_ste(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_fake_quantize_gradient_reaches_weight_inside_range():
    w = torch.randn(4, 16, requires_grad=True)
    scale, zero = compute_qparams(w.detach(), 4, 16, False)
    fake_quantize(w, scale, zero, 4, 16).sum().backward()
    assert torch.allclose(w.grad, torch.ones_like(w))


def test_activation_fake_quant_per_token():
    x = torch.randn(2, 5, 32) * torch.arange(1, 6).view(1, 5, 1)
    q8 = fake_quantize_activation(x, 8)
    q4 = fake_quantize_activation(x, 4)
    err8, err4 = (q8 - x).abs().amax(-1), (q4 - x).abs().amax(-1)
    assert torch.all(err8 <= err4 + 1e-6)
    assert torch.all(err8 <= (x.amax(-1) - x.amin(-1)) / 255)
    assert torch.equal(fake_quantize_activation(x, 16), x)


@pytest.mark.parametrize("bad", [dict(wbits=1), dict(wbits=9), dict(group=0), dict(abits=5)])
def test_spec_refuses_bad_values(bad):
    with pytest.raises(SpecError):
        QuantSpec(**bad)


def test_group_must_divide_input_dim():
    with pytest.raises(SpecError, match="does not divide the input dimension 576"):
        QuantSpec(4, 128).check_divides(576, "q_proj")


def test_contiguous_groups_broadcast_like_an_explicit_group_map():
    """quantize/dequantize/fake_quantize broadcast each (row, group) parameter over its columns;
    the explicit map g_idx = column // group gathers them per column: identical results. Catches a
    broadcast along the wrong axis or a reshape that mixes rows and groups; dequantize must not
    change the codes it is given (it works in place on its own copy)."""
    from quantcli.quant.affine import compute_qparams, dequantize, fake_quantize, quantize

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 96, generator=gen) * torch.linspace(0.1, 4, 24)[:, None]
    scale, zero = compute_qparams(w, 3, 32, False)
    g_idx = torch.arange(96) // 32
    codes = quantize(w, scale, zero, 3, 32)
    assert torch.equal(codes, quantize(w, scale, zero, 3, 32, g_idx))
    assert torch.equal(dequantize(codes, scale, zero, 32), dequantize(codes, scale, zero, 32, g_idx))
    assert torch.equal(fake_quantize(w, scale, zero, 3, 32), dequantize(codes, scale, zero, 32))
    as_float = codes.float()
    dequantize(as_float, scale, zero, 32)
    assert torch.equal(as_float, codes.float())
