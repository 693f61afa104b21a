"""The one block-wise driver every algorithm runs in.

It captures the inputs of decoder layer 0, then for each layer: moves it to the device, computes
the full-precision targets, hands the layer and its inputs to the algorithm, writes the
algorithm's quantized weights into the layer, forwards the now-quantized layer (activations
fake-quantized too when the spec asks for it) to get the next layer's inputs, and moves the layer
back. Algorithms never loop over layers themselves.

Layers come from a :class:`LayerSource`: a model in memory, or a streamed model whose layers are
read from the safetensors shards one at a time, so peak memory is one layer + the activations +
what the algorithm holds, whatever the depth. Each finished layer can go to a ``sink`` (written
to disk at once, see ``quantcli/resume.py``) together with the activations the next layer needs,
from which a killed run resumes.

Activations ``[N, L, H]`` live in an :class:`ActivationStore` (CPU memory by default, or
memory-mapped files on disk) and are streamed through the layer in mini-batches, so calibration
sets larger than device memory (or host memory) work.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Protocol

import torch
from torch import Tensor, nn

from quantcli import dist
from quantcli.calib.capture import capture_layer_inputs
from quantcli.models.arch import ArchSpec, arch_spec, decoder_layers, quantizable_linears
from quantcli.errors import InputError, NumericalError, SpecError
from quantcli.models.act_hooks import calibrate_static_inputs, install_spec_hooks
from quantcli.models.stream import InMemoryModel, to_device
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
    seen: dict = field(default_factory=dict)  # what the algorithm's ``observe`` recorded during the targets forward
    acts: "ActivationStore" = field(default_factory=lambda: ActivationStore())  # where per-token tensors the algorithm keeps go

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
    act_qparams: dict[str, Tensor] = field(default_factory=dict)  # static activation scales (set by the driver)


class LayerSource(Protocol):
    """Where the driver gets its layers (a model in memory, or one streamed from its shards)."""

    model: nn.Module  # the skeleton: config, embeddings, the layer list
    arch: ArchSpec
    layers: nn.ModuleList

    def onload_layer(self, index: int, device: torch.device) -> nn.Module: ...

    def offload_layer(self, index: int) -> None: ...

    def outside_layers(self, device: torch.device, head: bool = False) -> ContextManager[nn.Module]: ...


class LayerAlgo(Protocol):
    """An algorithm the driver runs per layer. It may also define ``observe(layer) ->
    ContextManager[dict]``: entered around the full-precision targets forward of ``layer`` (its
    hooks record e.g. submodule inputs into the dict, which arrives as ``ctx.seen``), so what the
    algorithm needs from the unquantized layer costs no forward of its own."""

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


@torch.no_grad()
def layer_forward(module: nn.Module, x: Tensor, kwargs: dict, device: torch.device, batch: int, out: Tensor | None = None) -> Tensor:
    """``module(x)`` for ``x: [N, L, H]`` in mini-batches on ``device``, computed in the module's dtype.

    The output goes into ``out`` when given (e.g. a disk-backed stream of the layer's own shape),
    else to ``x``'s device and dtype (any output width: sub-blocks such as an MLP or one linear).
    """
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), x.dtype)
    parts = []
    for start in range(0, x.shape[0], batch):
        y = module(x[start : start + batch].to(device, dtype), **kwargs)
        y = y[0] if isinstance(y, tuple) else y
        if out is None:
            parts.append(y.to(x.device, x.dtype))
        else:
            out[start : start + batch] = y.to(out.device, out.dtype)
    return torch.cat(parts) if out is None else out


class ActivationStore:
    """Where the calibration streams ``[N, L, H]`` live: in memory, or with ``directory`` in
    memory-mapped files there (unlinked at once, so the OS frees them with the tensor and may page
    them out), in ``dtype`` (float32; bfloat16 halves them at the cost of rounding the streams)."""

    def __init__(self, directory: Path | None = None, dtype: torch.dtype = torch.float32):
        self.directory, self.dtype, self._count = directory, dtype, 0
        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)

    def empty(self, shape: torch.Size, dtype: torch.dtype | None = None) -> Tensor:
        """An uninitialised tensor of ``shape`` in the store (in the store's dtype unless ``dtype``)."""
        dtype = dtype or self.dtype
        if self.directory is None:
            return torch.empty(shape, dtype=dtype)
        path = Path(self.directory) / f"quantcli-stream-{os.getpid()}-{self._count}.bin"
        self._count += 1
        tensor = torch.from_file(str(path), shared=True, size=math.prod(shape), dtype=dtype).view(shape)
        path.unlink()
        return tensor

    def put(self, x: Tensor) -> Tensor:
        out = self.empty(x.shape)
        out.copy_(x)
        return out


COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_compute_dtype(name: str, device) -> torch.dtype:
    """The dtype an algorithm's auxiliary forwards (AWQ's search, GPTQ's capture) run in: one of
    :data:`COMPUTE_DTYPES`, or ``auto``: bfloat16 where the device runs it fast (CUDA with bf16
    units, a CPU oneDNN runs bf16 on), else float32."""
    if name != "auto":
        return COMPUTE_DTYPES[name]
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float32
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def autocast_to(device, dtype: torch.dtype) -> ContextManager:
    """Autocast to ``dtype`` on ``device``'s type; a no-op for float32."""
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)


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
        raise InputError(f"--device {device}: CUDA is not available on this machine; use --device cpu or auto")
    return dist.bind(torch.device(device))


@dataclass
class Boundary:
    """The activation streams between two layers: what layer ``index`` receives.

    ``inputs``: the quantized stream ``[N, L, H]``; ``fp_inputs``: the full-precision stream
    (only for algorithms that ask for one). Both ``None`` for data-free algorithms.
    """

    index: int
    inputs: Tensor | None = None
    fp_inputs: Tensor | None = None


LayerSink = Callable[[int, LayerResult, Boundary], None]


def run_blockwise(
    model: nn.Module | LayerSource,
    calib_ids: Tensor | None,
    algo: LayerAlgo,
    spec: QuantSpec,
    device: torch.device,
    batch: int = 8,
    upstream: Callable[[int], dict[str, Tensor]] = lambda _i: {},
    on_layer: Callable[[LayerEvent], None] = lambda _e: None,
    on_update: Callable[..., None] = lambda **_: None,
    acts: ActivationStore | None = None,
    resume: Boundary | None = None,
    sink: LayerSink | None = None,
) -> DriverResult:
    """Run ``algo`` layer by layer over ``model`` with calibration tokens ``calib_ids: [N, L]``.

    ``model`` is a model in memory or a :class:`LayerSource` that materialises one decoder layer
    at a time (a streamed model); only the embeddings are needed to capture layer 0's inputs.
    With ``calib_ids=None`` no activations are captured (data-free weight-only algorithms).
    ``resume`` starts at a saved boundary instead of layer 0. ``sink(index, result, boundary)``
    receives each finished layer with the streams the next layer needs; without a sink the
    results are collected in the returned :class:`DriverResult` under full module names.
    Metrics per layer: ``loss`` = mean squared error of the quantized layer's output against the
    full-precision target. Outputs that are not finite stop the run (:class:`NumericalError`).
    """
    started = time.time()
    source = model if hasattr(model, "onload_layer") else InMemoryModel(model)
    arch, config = source.arch, source.model.config
    check_spec(source.model, spec)
    prefix = arch.layers_path
    use_cache = getattr(config, "use_cache", None)
    config.use_cache = False

    data_free = calib_ids is None
    if data_free and spec.act_static:
        raise SpecError("--act-static calibrates activation scales: pass --calib (or calibration flags)")
    acts = acts or ActivationStore()
    boundary = resume or Boundary(0)
    layer_kwargs: list[dict] = [{} for _ in source.layers]
    if not data_free:
        with source.outside_layers(device) as outer:
            captured, layer_kwargs = capture_layer_inputs(outer, source.layers, dist.shard(calib_ids, "calibration blocks"), batch)
        if resume is None:
            boundary = Boundary(0, acts.put(captured), acts.put(captured) if algo.needs_fp_stream else None)

    result = DriverResult({}, {}, {}, [], 0.0)
    for index in range(boundary.index, len(source.layers)):
        t0 = time.time()
        layer = source.onload_layer(index, device)
        kwargs = {k: to_device(v, device) for k, v in layer_kwargs[index].items()}
        layer_result, boundary, loss, forward_seconds = layer_step(
            algo, layer, boundary, kwargs, spec, arch, device, batch, acts, upstream(index),
            report=lambda **m: on_update(index=index, **m),
        )
        source.offload_layer(index)

        seconds = time.time() - t0
        algo_metrics = layer_result.metrics
        layer_result.metrics = {"layer": index, "loss": loss, "seconds": round(seconds, 3), **algo_metrics}
        if forward_seconds is not None:  # one plain forward of the layer over the calibration set: the unit of the stage's cost
            layer_result.metrics["forward_seconds"] = round(forward_seconds, 3)
        if sink is not None:
            sink(index, layer_result, boundary)
        else:
            full = f"{prefix}.{index}."
            result.quantized.update({full + k: v for k, v in layer_result.quantized.items()})
            result.saved.update({full + k: v.cpu() for k, v in layer_result.saved.items()})
            result.overrides.update({full + k: v.cpu() for k, v in layer_result.overrides.items()})
            result.act_qparams.update({full + k: v.cpu() for k, v in layer_result.act_qparams.items()})
        result.layers.append(layer_result.metrics)
        on_layer(LayerEvent(index, len(source.layers), f"{prefix}.{index}", loss, seconds, algo_metrics))

    config.use_cache = use_cache
    result.seconds = time.time() - started
    return result


def layer_step(
    algo: LayerAlgo,
    layer: nn.Module,
    boundary: Boundary,
    kwargs: dict,
    spec: QuantSpec,
    arch: ArchSpec,
    device: torch.device,
    batch: int,
    acts: ActivationStore,
    upstream: dict[str, Tensor],
    report: Callable[..., None] = lambda **_: None,
) -> tuple[LayerResult, Boundary, float | None, float | None]:
    """One layer of :func:`run_blockwise`: ``layer`` (on ``device``) receives ``boundary``.

    Computes the full-precision targets (with the algorithm's ``observe`` entered around them),
    runs the algorithm, writes its weights into ``layer``, and forwards the quantized layer.
    Returns the algorithm's result, the boundary of the next layer, the loss and the seconds of
    the propagation forward (both None when data-free).
    """
    index, inputs, fp_inputs = boundary.index, boundary.inputs, boundary.fp_inputs
    data_free = inputs is None
    name = f"{arch.layers_path}.{index}"
    fp_in = inputs if fp_inputs is None else fp_inputs
    observe = getattr(algo, "observe", None)
    with nullcontext({}) if data_free or observe is None else observe(layer) as seen:
        targets = None if data_free else layer_forward(layer, fp_in, kwargs, device, batch, acts.empty(fp_in.shape))
    ctx = LayerContext(index, name, layer, inputs, targets, kwargs, device, spec, arch, batch, upstream, report=report, seen=seen, acts=acts)
    layer_result = algo.run_layer(ctx)
    for rel, value in layer_result.overrides.items():
        layer.get_parameter(rel).data.copy_(value.to(device))
    for rel, qw in layer_result.quantized.items():
        layer.get_submodule(rel).weight.data.copy_(qw.dequantize().to(device))
    if data_free:
        return layer_result, Boundary(index + 1), None, None
    # the next layer sees this one as evaluation will: activations (and KV) quantized too
    names, static = list(layer_result.quantized), None
    if spec.act_static and names and not spec.weight_only:
        static = calibrate_static_inputs(layer, names, spec, lambda: layer_forward(layer, inputs, kwargs, device, batch))
        layer_result.act_qparams.update(static)
    hooks = install_spec_hooks(layer, names, spec, static)
    forward_started = time.time()
    outputs = layer_forward(layer, inputs, kwargs, device, batch, acts.empty(inputs.shape))
    forward_seconds = time.time() - forward_started
    for hook in hooks:
        hook.remove()
    if not torch.isfinite(outputs).all():
        raise NumericalError(
            f"layer {index} ({name}): its quantized outputs contain NaN or Inf; "
            f"layers before it are kept, re-run with other parameters (or the same to retry)"
        )
    loss = dist.all_mean(torch.mean((outputs - targets).float() ** 2).item(), outputs.numel())
    return layer_result, Boundary(index + 1, outputs, targets if fp_inputs is not None else None), loss, forward_seconds
