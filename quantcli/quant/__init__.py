"""Pure quantizer math: tensors in, tensors out."""

from quantcli.quant.spec import QuantSpec
from quantcli.quant.affine import (
    QuantizedWeight,
    compute_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_activation,
    quantize,
    quantize_weight,
    round_ste,
)

__all__ = [
    "QuantSpec",
    "QuantizedWeight",
    "compute_qparams",
    "dequantize",
    "fake_quantize",
    "fake_quantize_activation",
    "quantize",
    "quantize_weight",
    "round_ste",
]
