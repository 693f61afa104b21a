"""Everything humans read: rich progress bars and tables on stderr. Only the CLI imports rich."""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

err = Console(stderr=True, highlight=False)
FALLBACKS = "fallbacks"  # per-layer metrics key: list[str], one note per linear/group the algorithm fell back on


def emit(text: str) -> None:
    """The machine-readable result of a command: the only thing written to stdout."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def peak_memory_text() -> str:
    """Peak resident memory of this process so far (and of the GPU allocator when CUDA was used)."""
    text = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        text += f", GPU {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    return text


def _metrics_text(metrics: dict) -> str:
    text = "  ".join(f"{k} {_fmt(v)}" for k, v in metrics.items() if not isinstance(v, (list, dict)))
    return text + (f"  [yellow]fallbacks {len(metrics[FALLBACKS])}[/]" if metrics.get(FALLBACKS) else "")


class LayerProgress:
    """A per-layer progress bar fed by the driver's callbacks; silent when quiet or not a TTY."""

    def __init__(self, title: str, quiet: bool):
        self.title = title
        self.enabled = not quiet and err.is_terminal
        self.quiet = quiet
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=err,
            transient=False,
            disable=not self.enabled,
        )
        self.task = None

    def __enter__(self):
        self.started = time.monotonic()
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def on_layer(self, event) -> None:
        if self.task is None:
            self.task = self.progress.add_task(self.title, total=event.total, status="")
        loss = "" if event.loss is None else f"loss {event.loss:.3g}  "
        status = f"{event.name}  {loss}{_metrics_text(event.metrics)}  {event.seconds:.1f}s  {peak_memory_text()}"
        self.progress.update(self.task, completed=event.index + 1, status=status)
        if not self.enabled and not self.quiet:
            done = event.index + 1
            elapsed = time.monotonic() - self.started
            eta = elapsed / done * (event.total - done)
            err.print(f"{self.title} layer {done}/{event.total}: {status}  elapsed {elapsed:.0f}s eta {eta:.0f}s", soft_wrap=True)

    def on_update(self, index: int, **metrics) -> None:
        if self.task is not None or self.enabled:
            if self.task is None:
                self.task = self.progress.add_task(self.title, total=None, status="")
            self.progress.update(self.task, status=f"layer {index}  {_metrics_text(metrics)}")


def layer_table(title: str, layers: list[dict]) -> None:
    """Summary table of per-layer metrics (a ``fallbacks`` column counts each layer's fallbacks)."""
    if not layers:
        return
    keys = [k for k in layers[0] if not isinstance(layers[0][k], (list, dict))]
    with_fallbacks = any(row.get(FALLBACKS) for row in layers)
    table = Table(title=title)
    for key in keys + ([FALLBACKS] if with_fallbacks else []):
        table.add_column(key, justify="right")
    for row in layers:
        cells = [_fmt(row.get(k, "")) for k in keys]
        table.add_row(*cells, *([str(len(row.get(FALLBACKS, [])))] if with_fallbacks else []))
    err.print(table)


def show_fallbacks(title: str, layers: list[dict], quiet: bool) -> None:
    """Every fallback the algorithm recorded (metrics key ``fallbacks``: one note per linear or group
    that did not get the algorithm's treatment), one line per distinct note with the layers it hit;
    ``quiet`` prints only their count."""
    by_note: dict[str, list] = {}
    for i, row in enumerate(layers):
        for note in row.get(FALLBACKS, []):
            by_note.setdefault(note, []).append(row.get("layer", i))
    if not by_note:
        return
    total = sum(len(where) for where in by_note.values())
    if quiet:
        err.print(f"{title}: {total} fallbacks (listed under metrics.layers[].fallbacks in manifest.json)")
        return
    err.print(f"[yellow]{title}: {total} fallbacks[/]")
    for note, where in by_note.items():
        err.print(f"  [yellow]fallback[/] layer{'s' if len(where) > 1 else ''} {_ranges(where)}: {note}")


def _ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` → ``"0-2, 5"``."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


@contextmanager
def status(text: str, quiet: bool):
    if quiet or not err.is_terminal:
        yield
    else:
        with err.status(text):
            yield
