"""Pure quantizer math: tensors in, tensors out."""

from quantcli.quant.spec import QuantSpec
from quantcli.quant.affine import (
    QuantizedWeight,
    choose_qparams,
    clip_range,
    compute_qparams,
    dequantize,
    dequantize_affine,
    fake_quantize,
    fake_quantize_activation,
    quantize,
    quantize_affine,
    quantize_weight,
    round_ste,
)

__all__ = [
    "QuantSpec",
    "QuantizedWeight",
    "choose_qparams",
    "clip_range",
    "compute_qparams",
    "dequantize",
    "dequantize_affine",
    "fake_quantize",
    "fake_quantize_activation",
    "quantize",
    "quantize_affine",
    "quantize_weight",
    "round_ste",
]
