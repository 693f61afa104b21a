"""Option aliases shared by the commands (``Annotated`` types), the option groups every algorithm
command shares, and their parsing helpers.

The algorithm commands (rtn, awq, gptq, omniquant) share three groups of options, declared once
here as frozen dataclasses whose fields are the options: :class:`WeightArgs` (the weight spec),
:class:`CalibArgs` (where calibration tokens come from) and :class:`RunArgs` (output, device,
batch, force, quiet). A command names a group as one parameter, ``weights: WeightArgs``, and
:func:`option_groups` expands it into the group's options in the signature typer reads, then
hands the command one frozen object built from them. An option left unset is ``None``: the
value then comes from the parent artifact (``--init-from`` or an artifact INPUT) or from the
single default in the core (:class:`QuantSpec`, :class:`CalibParams`, :class:`RunParams`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import stat
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from quantcli.calib.data import BOS_MODES
from quantcli.errors import InputError, SpecError
from quantcli.quant import QuantSpec
from quantcli.stage import DEFAULT_SEQLEN, CalibParams, RunParams

InputArg = Annotated[
    Optional[str],
    typer.Argument(
        help="Model directory, .gguf file, cached hub id or quantcli artifact. Omitted: the path piped on stdin, else the embedded default model.",
        show_default=False,
    ),
]
Output = Annotated[Path, typer.Option("--output", "-o", help="Artifact directory to create.")]
StageOutput = Annotated[
    Optional[Path],
    typer.Option(
        "--output", "-o",
        help="Artifact directory to create. Default: a sibling of INPUT named <input>-<command> (never overwritten without --force).",
        show_default=False,
    ),
]
Force = Annotated[bool, typer.Option("--force", help="Replace the output if it exists.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables on stderr.")]
Batch = Annotated[
    Optional[int],
    typer.Option(
        "--batch-size", min=1, show_default=False,
        help=f"Calibration samples per forward pass (default {RunParams.batch}; omniquant: per training step, default its training batch).",
    ),
]
OffloadActivations = Annotated[
    Optional[Path],
    typer.Option(
        "--offload-activations", metavar="DIR", show_default=False,
        help="Keep the calibration activations (each layer's inputs and full-precision outputs, samples × seqlen × hidden "
        "float32 apiece) in memory-mapped files in DIR (created if needed) instead of RAM, so the OS can page them out; "
        "the files are unlinked as soon as they are made, nothing is left behind. Same results, slower on a slow disk.",
    ),
]

W2 = Annotated[bool, typer.Option("--w2", help="2-bit weights.")]
W3 = Annotated[bool, typer.Option("--w3", help="3-bit weights.")]
W4 = Annotated[bool, typer.Option("--w4", help="4-bit weights (the default).")]
W8 = Annotated[bool, typer.Option("--w8", help="8-bit weights.")]
WBits = Annotated[Optional[int], typer.Option("--wbits", help="Weight bits, 2..8.", show_default=False)]
_INHERITED = "or the parent artifact's"
Group = Annotated[
    Optional[int],
    typer.Option("--group", help="Input channels per scale; -1 = per output channel.", show_default=f"{QuantSpec.group}, {_INHERITED}"),
]
Sym = Annotated[
    Optional[bool],
    typer.Option("--sym/--asym", help="Symmetric or asymmetric (zero point) weights.", show_default=f"{'sym' if QuantSpec.sym else 'asym'}, {_INHERITED}"),
]
ABits = Annotated[
    Optional[int],
    typer.Option("--abits", help="Activation bits: 16 (weight-only), 8, 6 or 4 (per-token dynamic).", show_default=f"{QuantSpec.abits}, {_INHERITED}"),
]
W8A8 = Annotated[bool, typer.Option("--w8a8", help="8-bit weights and 8-bit activations.")]
W4A8 = Annotated[bool, typer.Option("--w4a8", help="4-bit weights and 8-bit activations.")]
W4A4 = Annotated[bool, typer.Option("--w4a4", help="4-bit weights and 4-bit activations.")]
ActSym = Annotated[
    Optional[bool],
    typer.Option("--act-sym/--act-asym", help="Symmetric or asymmetric (zero point) activations.", show_default=f"{'sym' if QuantSpec.act_sym else 'asym'}, {_INHERITED}"),
]
ActStatic = Annotated[
    Optional[bool],
    typer.Option(
        "--act-static/--act-dynamic",
        help="One calibrated scale per linear input (stored in the artifact) or per-token dynamic scales.",
        show_default=f"{'static' if QuantSpec.act_static else 'dynamic'}, {_INHERITED}",
    ),
]
KVBits = Annotated[
    Optional[int],
    typer.Option("--kv-bits", help="KV-cache bits: 16 (off), 8 or 4 (per head and token; keys after RoPE).", show_default=f"{QuantSpec.kv_bits}, {_INHERITED}"),
]

Calib = Annotated[Optional[Path], typer.Option("--calib", help="Calibration artifact from quant calibrate.", show_default=False)]
Dataset = Annotated[str, typer.Option("--dataset", help="wikitext2, c4, ptb, pileval, builtin, or a .txt/.jsonl/.parquet file or folder.")]
NSamples = Annotated[int, typer.Option("--nsamples", help="Calibration blocks.", min=1)]
SEQLEN_HELP = (
    f"Tokens per block. Default {DEFAULT_SEQLEN} (the GPTQ and OmniQuant papers' 128 × 2048 protocol, "
    "and the length eval-ppl scores), capped at the model's context window."
)
SeqLen = Annotated[Optional[int], typer.Option("--seqlen", help=SEQLEN_HELP, min=2, show_default=False)]
Seed = Annotated[int, typer.Option("--seed", help="Seed for sampling the blocks.")]
# the same options unset by default, so an algorithm stage can tell "given" from "inherited"
StageDataset = Annotated[Optional[str], typer.Option("--dataset", help=Dataset.__metadata__[0].help, show_default=f"{CalibParams.dataset}, {_INHERITED}")]
StageNSamples = Annotated[Optional[int], typer.Option("--nsamples", help="Calibration blocks.", min=1, show_default=f"{CalibParams.nsamples}, {_INHERITED}")]
StageSeed = Annotated[Optional[int], typer.Option("--seed", help="Seed for sampling the blocks.", show_default=f"{CalibParams.seed}, {_INHERITED}")]


def _bos_mode(value: str | None) -> str | None:
    if value is not None and value not in BOS_MODES:
        raise typer.BadParameter(f"use one of {', '.join(BOS_MODES)}")
    return value


BOS_HELP = "BOS token at the head of every block/window: auto (when the tokenizer adds one by default, e.g. Gemma's), always or never."
Bos = Annotated[str, typer.Option("--bos", help=BOS_HELP, callback=_bos_mode)]
StageBos = Annotated[Optional[str], typer.Option("--bos", help=BOS_HELP, callback=_bos_mode, show_default=f"{CalibParams.bos}, {_INHERITED}")]


# --------------------------------------------------------------------------- option groups


@dataclass(frozen=True)
class WeightArgs:
    """The weight-spec flags as given; ``None``/``False`` means not given."""

    w2: W2 = False
    w3: W3 = False
    w4: W4 = False
    w8: W8 = False
    wbits: WBits = None
    group: Group = None
    sym: Sym = None
    abits: ABits = None
    w8a8: W8A8 = False
    w4a8: W4A8 = False
    w4a4: W4A4 = False
    act_sym: ActSym = None
    act_static: ActStatic = None
    kv_bits: KVBits = None

    @property
    def given(self) -> bool:
        flags = (self.w2, self.w3, self.w4, self.w8, self.w8a8, self.w4a8, self.w4a4)
        values = (self.wbits, self.group, self.sym, self.abits, self.act_sym, self.act_static, self.kv_bits)
        return any(flags) or any(v is not None for v in values)

    def spec(self, inherited: QuantSpec | None = None) -> QuantSpec:
        """The QuantSpec: each flag given wins, else the inherited spec's field, else QuantSpec's default.

        Conflicting bit flags are an error; ``--wXaY`` sets both bit widths and conflicts with a
        weight-bit flag or a different ``--abits``.
        """
        chosen = {bits for bits, on in ((2, self.w2), (3, self.w3), (4, self.w4), (8, self.w8)) if on}
        if self.wbits is not None:
            chosen.add(self.wbits)
        if len(chosen) > 1:
            raise SpecError(f"conflicting weight bit flags ({', '.join(map(str, sorted(chosen)))} bits): give one of --w2/--w3/--w4/--w8/--wbits")
        wa = [bits for bits, on in (((8, 8), self.w8a8), ((4, 8), self.w4a8), ((4, 4), self.w4a4)) if on]
        if len(wa) > 1:
            raise SpecError("conflicting flags: give one of --w8a8/--w4a8/--w4a4")
        abits = self.abits
        if wa:
            (wbits, wa_abits), flag = wa[0], f"--w{wa[0][0]}a{wa[0][1]}"
            if chosen:
                raise SpecError(f"{flag} sets the weight bits: drop --w2/--w3/--w4/--w8/--wbits")
            if abits is not None and abits != wa_abits:
                raise SpecError(f"{flag} sets --abits {wa_abits}: drop --abits {abits}")
            chosen, abits = {wbits}, wa_abits
        base = inherited or QuantSpec()
        return QuantSpec(
            wbits=chosen.pop() if chosen else base.wbits,
            group=base.group if self.group is None else self.group,
            sym=base.sym if self.sym is None else self.sym,
            abits=base.abits if abits is None else abits,
            act_sym=base.act_sym if self.act_sym is None else self.act_sym,
            act_static=base.act_static if self.act_static is None else self.act_static,
            kv_bits=base.kv_bits if self.kv_bits is None else self.kv_bits,
        )


@dataclass(frozen=True)
class CalibArgs:
    """Where the calibration tokens come from, as given; ``None`` means not given."""

    calib: Calib = None
    dataset: StageDataset = None
    nsamples: StageNSamples = None
    seqlen: SeqLen = None
    seed: StageSeed = None
    bos: StageBos = None

    @property
    def given(self) -> bool:
        return any(v is not None for v in dataclasses.astuple(self))

    def params(self) -> CalibParams:
        """The flags given over :class:`CalibParams`' defaults (``seqlen=None``: capped default, see there)."""
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(CalibParams) if getattr(self, f.name, None) is not None}
        return CalibParams(**given)


@dataclass(frozen=True)
class RunArgs:
    """Where the artifact goes and how the stage runs."""

    output: StageOutput = None
    device: Device = RunParams.device
    batch_size: Batch = None
    force: Force = False
    quiet: Quiet = False
    offload_activations: OffloadActivations = None

    def params(self, batch: int | None = None) -> RunParams:
        """``batch``: the algorithm's own default batch, used when ``--batch-size`` is not given."""
        return RunParams(self.device, self.batch_size or batch or RunParams.batch, self.force, self.offload_activations)


OPTION_GROUPS = (WeightArgs, CalibArgs, RunArgs)


def option_groups(command):
    """Expand every parameter of ``command`` annotated with an option group into the group's options.

    ``def awq_command(input: InputArg = None, weights: WeightArgs = WeightArgs(), ...)`` is shown
    to typer as ``input, w2, w3, …, abits, …`` (the group's fields in its place, so ``--help``
    lists options in declaration order); on a call the group's values are collected back into one
    frozen ``WeightArgs`` passed as ``weights``. Field names must be unique across a command's groups.
    """
    hints = typing.get_type_hints(command, include_extras=True)
    params, groups = [], {}
    for param in inspect.signature(command).parameters.values():
        cls = hints.get(param.name)
        if cls in OPTION_GROUPS:
            field_hints = typing.get_type_hints(cls, include_extras=True)
            groups[param.name] = (cls, [f.name for f in dataclasses.fields(cls)])
            params += [
                inspect.Parameter(f.name, param.kind, default=f.default, annotation=field_hints[f.name])
                for f in dataclasses.fields(cls)
            ]
        else:
            params.append(param.replace(annotation=hints.get(param.name, param.annotation)))
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise TypeError(f"{command.__name__}: an option group repeats a parameter name: {sorted(names)}")

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        for name, (cls, fields) in groups.items():
            kwargs[name] = cls(**{f: kwargs.pop(f) for f in fields if f in kwargs})
        return command(*args, **kwargs)

    wrapper.__signature__ = inspect.Signature(params)
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


# --------------------------------------------------------------------------- INPUT and outputs


def default_output(source: str | None, command: str) -> Path:
    """``model/`` → ``model-awq`` beside it; a .gguf file → ``<stem>-awq``; a hub id or the default model → in the cwd."""
    if source is None:
        return Path(f"default-{command}")
    path = Path(source)
    if path.exists():
        if path.name in ("", ".", ".."):
            path = path.resolve()
        name = path.stem if path.is_file() else path.name
        return path.parent / f"{name}-{command}"
    return Path(f"{source.rstrip('/').split('/')[-1]}-{command}")


def _stdin_is_pipe() -> bool | None:
    """True for a pipe or file on stdin, False for a terminal or /dev/null, None if unknown."""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (AttributeError, OSError, ValueError):
        return None
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def input_or_stdin(value: str | None) -> str | None:
    """INPUT as given, else the last path a previous stage printed on a piped stdin, else None.

    An empty pipe is an error (the previous stage failed), never a silent fall-back to the default.
    """
    if value is not None:
        return value
    piped = _stdin_is_pipe()
    if sys.stdin is None or piped is False:
        return None
    try:
        lines = [line.strip() for line in sys.stdin.read().splitlines() if line.strip()]
    except (OSError, ValueError):
        lines = []
    if not lines:
        if piped:
            raise InputError("stdin: the previous stage printed no artifact path (did it fail?); pass INPUT explicitly")
        return None
    if not Path(lines[-1]).exists():
        raise InputError(f"stdin: {lines[-1][:120]!r} is not a path; pipe in a command that prints an artifact path")
    return lines[-1]
