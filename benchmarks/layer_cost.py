"""Cost of one decoder layer: an algorithm's driver step as a multiple of one plain float32 forward.

Loads ONE decoder layer of a streamed safetensors model, captures its inputs for N × L random
tokens through the embeddings, and times in one process, interleaved and repeated (the machine
is shared: the minimum of the repeats counts):

(a) one plain float32 forward of the layer over the N × L inputs;
(b) the driver's whole step for that layer with ``--algo`` (``driver.layer_step``: targets with
    the algorithm's ``observe``, ``run_layer``, writing the codes, propagation). The layer's
    weights are restored after each repeat.

The step is broken down by wrapping the functions it calls (exclusive times: a phase nested in
another is not counted twice): the driver's targets and propagation forwards, and for GPTQ the
capture forwards, Hessian accumulation, factorisation and column loop (whatever of these the
code being measured defines).

    python benchmarks/layer_cost.py --model benchmarks/results/work/scale/1.2b --algo gptq --nsamples 8 --seqlen 512
    python benchmarks/layer_cost.py --model .../7b --algo awq --set search_dtype=float32 --label awq-fp32

Writes benchmarks/results/layer_cost.json (one entry per model, algorithm and label, merged with
what is there) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "layer_cost.json"

# (module, function, phase): the phases of a step, wrapped where the measured code defines them
PHASES = [
    ("quantcli.algos.gptq", "capture_hessians", "capture forwards"),
    ("quantcli.algos.gptq", "accumulate_hessian", "hessian accumulation"),
    ("quantcli.algos.gptq", "damp_and_factor", "factorisation"),
    ("quantcli.algos.gptq", "gptq_quantize", "column loop"),
    ("quantcli.algos.gptq", "hessian_error", "error metrics"),
    ("quantcli.algos.gptq", "rtn_error_estimate", "error metrics"),
    ("quantcli.algos.awq", "search_scale", "scale search"),
    ("quantcli.algos.awq", "search_clip", "clip search"),
    ("quantcli.algos.awq", "_capture_inputs", "capture forwards"),
]


class Profile:
    """Exclusive wall time per phase of the wrapped functions (nested phases are subtracted)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.stack: list[float] = []  # time spent in children, per open frame
        self.forwards = 0  # driver.layer_forward calls this step: the first is the targets forward
        self._undo: list = []

    def _timed(self, phase_of, fn):
        def wrapper(*args, **kwargs):
            phase = phase_of()
            self.stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                total = time.perf_counter() - t0
                children = self.stack.pop()
                self.seconds[phase] = self.seconds.get(phase, 0.0) + total - children
                if self.stack:
                    self.stack[-1] += total

        return wrapper

    def patch(self, module, name: str, phase_of) -> None:
        fn = getattr(module, name, None)
        if fn is None:
            return
        setattr(module, name, self._timed(phase_of, fn))
        self._undo.append((module, name, fn))

    def install(self, algo) -> None:
        from quantcli.algos import driver

        def forward_phase():
            self.forwards += 1
            return "targets forward" if self.forwards == 1 else "propagation"

        self.patch(driver, "layer_forward", forward_phase)
        for module_name, fn, phase in PHASES:
            module = importlib.import_module(module_name)
            self.patch(module, fn, lambda phase=phase: phase)
        # what run_layer spends outside the phases above
        object.__setattr__(algo, "run_layer", self._timed(lambda: "algorithm (other)", algo.run_layer))

    def reset(self) -> None:
        self.seconds, self.stack, self.forwards = {}, [], 0

    def remove(self) -> None:
        for module, name, fn in reversed(self._undo):
            setattr(module, name, fn)


def make_algo(name: str, settings: list[str]):
    """The algorithm object with its default params, overridden by ``key=value`` settings."""
    if name == "gptq":
        from quantcli.algos.gptq import GPTQ as Algo, GPTQParams as Params
    elif name == "awq":
        from quantcli.algos.awq import AWQ as Algo, AWQParams as Params
    elif name == "rtn":
        from quantcli.algos.rtn import RTN as Algo, RTNParams as Params
    else:
        raise SystemExit(f"--algo {name}: use gptq, awq or rtn")
    fields = {f.name: f for f in dataclasses.fields(Params)}
    values = {}
    for item in settings:
        key, _, raw = item.partition("=")
        if key not in fields:
            raise SystemExit(f"--set {item}: {Params.__name__} has no field {key!r} (fields: {', '.join(fields)})")
        default = getattr(Params(), key)
        values[key] = raw.lower() in ("1", "true", "yes") if isinstance(default, bool) else type(default)(raw) if default is not None else raw
    params = Params(**values)
    return Algo(params), dataclasses.asdict(params)


def git_rev() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="a streamable safetensors model directory")
    ap.add_argument("--algo", default="gptq", choices=["gptq", "awq", "rtn"])
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--wbits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="samples per forward mini-batch (the CLI's default)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an algorithm parameter")
    ap.add_argument("--label", default=None, help="name of this run in the JSON (default: the git revision)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    from quantcli.algos.driver import ActivationStore, Boundary, layer_forward, layer_step
    from quantcli.calib.capture import capture_layer_inputs
    from quantcli.models.stream import StreamedModel, to_device
    from quantcli.quant import QuantSpec

    device = torch.device(args.device)
    label = args.label or git_rev()
    load_start = os.getloadavg()
    model = StreamedModel(args.model)
    config = model.model.config
    config.use_cache = False
    ids = torch.randint(0, config.vocab_size, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    with model.outside_layers(device) as outer:
        captured, layer_kwargs = capture_layer_inputs(outer, model.layers, ids, args.batch)
    kwargs = {k: to_device(v, device) for k, v in layer_kwargs[args.layer].items()}
    if args.layer:  # deeper layers: the layer-0 inputs pushed through the layers before it (float32)
        for i in range(args.layer):
            captured = layer_forward(model.onload_layer(i, device), captured, {k: to_device(v, device) for k, v in layer_kwargs[i].items()}, device, args.batch)
            model.offload_layer(i)
    layer = model.onload_layer(args.layer, device)
    originals = {name: p.detach().clone() for name, p in layer.state_dict().items()}
    spec = QuantSpec(wbits=args.wbits, group=args.group)
    algo, params = make_algo(args.algo, args.set)
    profile = Profile()
    profile.install(algo)

    plain, steps, breakdowns = [], [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        layer_forward(layer, captured, kwargs, device, args.batch)
        plain.append(time.perf_counter() - t0)

        boundary = Boundary(args.layer, captured, captured.clone() if algo.needs_fp_stream else None)
        profile.reset()
        t0 = time.perf_counter()
        layer_step(algo, layer, boundary, kwargs, spec, model.arch, device, args.batch, ActivationStore(), {})
        steps.append(time.perf_counter() - t0)
        breakdowns.append(dict(profile.seconds))
        layer.load_state_dict(originals)
        print(f"  plain {plain[-1]:7.2f} s   {args.algo} step {steps[-1]:7.2f} s", flush=True)
    profile.remove()

    best = min(range(args.repeats), key=lambda r: steps[r])
    a, b = min(plain), steps[best]
    breakdown = {k: round(v, 3) for k, v in sorted(breakdowns[best].items(), key=lambda kv: -kv[1])}
    shapes = {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")}
    model_name = args.model.resolve().name
    entry = {
        "model": model_name,
        "algo": args.algo,
        "label": label,
        "revision": git_rev(),
        "layer": args.layer,
        "shapes": shapes,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "spec": f"w{args.wbits}g{args.group}",
        "params": params,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "plain_forward_s": round(a, 3),
        "step_s": round(b, 3),
        "ratio": round(b / a, 3),
        "breakdown_s": breakdown,
        "breakdown_in_forwards": {k: round(v / a, 3) for k, v in breakdown.items()},
        "repeats": {"plain_s": [round(t, 3) for t in plain], "step_s": [round(t, 3) for t in steps]},
        "loadavg": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
        "command": "python benchmarks/layer_cost.py " + " ".join(
            [f"--model {model_name}", f"--algo {args.algo}", f"--layer {args.layer}", f"--nsamples {args.nsamples}",
             f"--seqlen {args.seqlen}", f"--wbits {args.wbits}", f"--group {args.group}", f"--repeats {args.repeats}"]
            + [f"--set {s}" for s in args.set] + ([f"--label {args.label}"] if args.label else [])
        ),
    }

    print(f"\n{model_name} layer {args.layer}, {args.nsamples} × {args.seqlen} tokens, {args.algo} (label {label}):")
    print(f"  {'plain float32 forward':28s} {a:8.2f} s   1.00×")
    print(f"  {args.algo + ' driver step':28s} {b:8.2f} s   {b / a:5.2f}×")
    for phase, seconds in breakdown.items():
        print(f"    {phase:26s} {seconds:8.2f} s   {seconds / a:5.2f}×")
    print(f"  load average {entry['loadavg']}")

    data = json.loads(args.out.read_text()) if args.out.is_file() else {}
    data[f"{model_name}/{args.algo}/{label}"] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
