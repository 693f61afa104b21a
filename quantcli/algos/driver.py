"""The one block-wise driver every algorithm runs in.

It captures the inputs of decoder layer 0, then for each layer: moves it to the device, computes
the full-precision targets, hands the layer and its inputs to the algorithm, writes the
algorithm's quantized weights into the layer, forwards the now-quantized layer (activations
fake-quantized too when the spec asks for it) to get the next layer's inputs, and moves the layer
back. Algorithms never loop over layers themselves.

Activations ``[N, L, H]`` live on ``act_device`` (CPU by default) and are streamed through the
layer in mini-batches, so calibration sets larger than device memory work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import Tensor, nn

from quantcli import dist
from quantcli.calib.capture import capture_layer_inputs
from quantcli.models.arch import ArchSpec, arch_spec, decoder_layers, quantizable_linears
from quantcli.models.act_hooks import calibrate_static_inputs, install_spec_hooks
from quantcli.quant import QuantizedWeight, QuantSpec


@dataclass
class LayerContext:
    """What an algorithm gets for one decoder layer.

    ``inputs``: the layer's inputs ``[N, L, H]`` from the quantized stream.
    ``targets``: the full-precision layer's outputs ``[N, L, H]`` (on the fp stream when the
    algorithm asked for one, else on ``inputs``).
    ``kwargs``: attention mask, position embeddings, … already on ``device``.
    ``upstream``: tensors from a parent artifact for this layer (relative names).
    """

    index: int
    name: str
    module: nn.Module
    inputs: Tensor | None  # None when the algorithm runs without calibration data
    targets: Tensor | None
    kwargs: dict
    device: torch.device
    spec: QuantSpec
    arch: ArchSpec
    batch: int = 8
    upstream: dict[str, Tensor] = field(default_factory=dict)
    report: Callable[..., None] = lambda **_: None

    def linears(self) -> list[list[str]]:
        """The layer's linears to quantize, in true-sequential stages."""
        return quantizable_linears(self.module, self.arch)

    def forward(self, x: Tensor | None = None, module: nn.Module | None = None) -> Tensor:
        """Run ``module`` (default: the layer) over ``x`` (default: the inputs) in mini-batches."""
        return layer_forward(module or self.module, self.inputs if x is None else x, self.kwargs, self.device, self.batch)


@dataclass
class LayerResult:
    """What an algorithm returns for one layer (names relative to the layer)."""

    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    saved: dict[str, Tensor] = field(default_factory=dict)  # search results (AWQ scales, clips, …)
    overrides: dict[str, Tensor] = field(default_factory=dict)  # fp parameters the algorithm changed
    metrics: dict = field(default_factory=dict)


class LayerAlgo(Protocol):
    needs_fp_stream: bool

    def run_layer(self, ctx: LayerContext) -> LayerResult: ...


@dataclass
class LayerEvent:
    index: int
    total: int
    name: str
    loss: float | None
    seconds: float
    metrics: dict


@dataclass
class DriverResult:
    quantized: dict[str, QuantizedWeight]
    saved: dict[str, Tensor]
    overrides: dict[str, Tensor]
    layers: list[dict]  # per-layer metrics, in order
    seconds: float
    act_qparams: dict[str, Tensor] = field(default_factory=dict)  # static activation scales (act_static)


def _to(value, device):
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


@torch.no_grad()
def layer_forward(module: nn.Module, x: Tensor, kwargs: dict, device: torch.device, batch: int) -> Tensor:
    """``module(x)`` for ``x: [N, L, H]`` in mini-batches on ``device``; output on ``x``'s device."""
    outs = []
    for start in range(0, x.shape[0], batch):
        out = module(x[start : start + batch].to(device), **kwargs)
        outs.append((out[0] if isinstance(out, tuple) else out).to(x.device))
    return torch.cat(outs)


def check_spec(model: nn.Module, spec: QuantSpec) -> None:
    """Refuse before any work a spec that cannot apply to one of the model's linears."""
    arch = arch_spec(model)
    layers = decoder_layers(model, arch)
    for i, layer in enumerate(layers):
        for stage in quantizable_linears(layer, arch):
            for name in stage:
                spec.check_divides(layer.get_submodule(name).in_features, f"model layer {i} {name}")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return dist.bind(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        from quantcli.errors import InputError

        raise InputError(f"--device {device}: CUDA is not available on this machine; use --device cpu or auto")
    return dist.bind(torch.device(device))


def run_blockwise(
    model: nn.Module,
    calib_ids: Tensor | None,
    algo: LayerAlgo,
    spec: QuantSpec,
    device: torch.device,
    batch: int = 8,
    upstream: Callable[[int], dict[str, Tensor]] = lambda _i: {},
    on_layer: Callable[[LayerEvent], None] = lambda _e: None,
    on_update: Callable[..., None] = lambda **_: None,
    act_device: torch.device | str = "cpu",
) -> DriverResult:
    """Run ``algo`` layer by layer over ``model`` with calibration tokens ``calib_ids: [N, L]``.

    With ``calib_ids=None`` no activations are captured (data-free weight-only algorithms).

    Returns the quantized weights, saved search results and fp overrides under full module names,
    and one metrics dict per layer (``loss`` = mean squared error of the quantized layer's output
    against the full-precision target).
    """
    started = time.time()
    arch = arch_spec(model)
    check_spec(model, spec)
    layers = decoder_layers(model, arch)
    prefix = arch.layers_path
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False

    data_free = calib_ids is None
    if data_free and spec.act_static:
        from quantcli.errors import SpecError

        raise SpecError("--act-static calibrates activation scales: pass --calib (or calibration flags)")
    if data_free:  # weight-only algorithms without calibration data (RTN)
        inputs, fp_inputs, layer_kwargs = None, None, [{} for _ in layers]
    else:
        model.to(device)
        inputs, layer_kwargs = capture_layer_inputs(model, layers, dist.shard(calib_ids, "calibration blocks"), batch)
        model.to("cpu")
        inputs = inputs.to(act_device)
        fp_inputs = inputs.clone() if algo.needs_fp_stream else None

    result = DriverResult({}, {}, {}, [], 0.0)
    for index, layer in enumerate(layers):
        t0 = time.time()
        layer.to(device)
        kwargs = {k: _to(v, device) for k, v in layer_kwargs[index].items()}
        targets = None if data_free else layer_forward(layer, inputs if fp_inputs is None else fp_inputs, kwargs, device, batch)
        ctx = LayerContext(
            index, f"{prefix}.{index}", layer, inputs, targets, kwargs, device, spec, arch, batch,
            upstream(index), report=lambda **m: on_update(index=index, **m),
        )
        layer_result = algo.run_layer(ctx)
        for rel, value in layer_result.overrides.items():
            layer.get_parameter(rel).data.copy_(value.to(device))
        for rel, qw in layer_result.quantized.items():
            layer.get_submodule(rel).weight.data.copy_(qw.dequantize().to(device))
        loss = None
        full = f"{prefix}.{index}."
        if not data_free:  # the next layer sees this one as evaluation will: activations (and KV) quantized too
            names, static = list(layer_result.quantized), None
            if spec.act_static and names and not spec.weight_only:
                static = calibrate_static_inputs(layer, names, spec, lambda: layer_forward(layer, inputs, kwargs, device, batch))
                result.act_qparams.update({full + k: v for k, v in static.items()})
            hooks = install_spec_hooks(layer, names, spec, static)
            outputs = layer_forward(layer, inputs, kwargs, device, batch)
            for hook in hooks:
                hook.remove()
            loss = dist.all_mean(torch.mean((outputs - targets).float() ** 2).item(), outputs.numel())
            inputs, fp_inputs = outputs, (targets if fp_inputs is not None else None)
        layer.to("cpu")

        result.quantized.update({full + k: v for k, v in layer_result.quantized.items()})
        result.saved.update({full + k: v.cpu() for k, v in layer_result.saved.items()})
        result.overrides.update({full + k: v.cpu() for k, v in layer_result.overrides.items()})
        seconds = time.time() - t0
        metrics = {"layer": index, "loss": loss, "seconds": round(seconds, 3), **layer_result.metrics}
        result.layers.append(metrics)
        on_layer(LayerEvent(index, len(layers), f"{prefix}.{index}", loss, seconds, layer_result.metrics))

    model.config.use_cache = use_cache
    result.seconds = time.time() - started
    return result
