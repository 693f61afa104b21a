"""Round-to-nearest: the baseline every other algorithm is measured against.

Objective: none; each weight goes to its nearest grid point under min/max (or abs-max) scales.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantcli.algos.driver import LayerContext, LayerResult
from quantcli.algos.replay import register_no_replay
from quantcli.quant import quantize_weight


@dataclass(frozen=True)
class RTNParams:
    """RTN has no parameters beyond the quantization spec."""


@dataclass(frozen=True)
class RTN:
    params: RTNParams = RTNParams()
    needs_fp_stream: bool = False

    def run_layer(self, ctx: LayerContext) -> LayerResult:
        quantized = {
            name: quantize_weight(ctx.module.get_submodule(name).weight.data, ctx.spec)
            for stage in ctx.linears()
            for name in stage
        }
        return LayerResult(quantized=quantized)


register_no_replay("rtn")  # RTN changes nothing in full precision: its codes are the whole stage
