"""Quantizer math: error bounds, grouping, symmetry, STE, activation fake-quant."""

import pytest
import torch

from quantcli.errors import SpecError
from quantcli.quant import QuantSpec, compute_qparams, dequantize, fake_quantize, fake_quantize_activation, quantize, quantize_weight, round_ste


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


def test_g_idx_dequantize_matches_permuted_groups():
    w = torch.randn(4, 8)
    scale, zero = compute_qparams(w, 4, 4, False)
    g_idx = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1], dtype=torch.int32)
    codes = quantize(w, scale, zero, 4, 4, g_idx)
    assert torch.equal(dequantize(codes, scale, zero, 4, g_idx), dequantize(codes, scale, zero, 4))


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
