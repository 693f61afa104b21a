"""``quant bench --plot FILE.png``: latency against prompt length, quantized vs baselines.

Two panels side by side, time to first token and per-token decode latency, one line per model
(the quantized model and every baseline in the result), log-scaled prompt length (and time, when it
spans more than a decade), each point labelled with its value. matplotlib is the optional extra
``plot``; it is imported only here, only when a plot is asked for.
"""

from __future__ import annotations

from pathlib import Path

from quantcli.errors import InputError


COLORS = {"fp32": "C1", "float32": "C1", "bf16": "C2", "bfloat16": "C2", "fp16": "C3", "float16": "C3"}


def series(result: dict) -> list[tuple[str, list[dict]]]:
    """``[(label, rows)]`` for the quantized model and each baseline of a ``run_bench`` result.

    Accepts both one baseline (``result["baseline"]``) and several (``result["baselines"]``:
    ``{name: bench dict}``).
    """
    kind = result.get("kind", "model")
    spec = result.get("spec") or {}
    label = kind if not spec else f"{kind} w{spec.get('wbits')}" + (f"g{spec['group']}" if spec.get("group", -1) > 0 else "")
    out = [(label, result["results"])]
    baselines = dict(result.get("baselines") or {})
    if "baseline" in result:
        baselines.setdefault(result["baseline"]["dtype"], result["baseline"])
    for name, base in baselines.items():
        out.append((f"{name} (unquantized)", base["results"]))
    return out


def pyplot(path: str | Path):
    """matplotlib's pyplot on the file-only Agg backend; an :class:`InputError` naming the extra if
    matplotlib is missing (call it before a long benchmark to fail fast)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError(
            f"--plot {path}: matplotlib is not installed; install it with pip install 'quantcli[plot]'"
        ) from None
    return plt


def plot_latency(result: dict, path: str | Path) -> Path:
    """Write the two-panel latency plot of ``result`` to ``path`` (PNG, or any format matplotlib
    infers from the suffix); returns the path. A missing matplotlib is an :class:`InputError`."""
    plt = pyplot(path)
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (("prefill_ms", "Time to first token (ms)"), ("decode_ms", "Decode latency (ms / token)"))
    for ax, (key, title) in zip(axes, panels):
        for i, (label, rows) in enumerate(series(result)):
            pts = [(r["prompt_len"], r[key]) for r in rows if key in r]
            if not pts:
                continue
            xs, ys = zip(*pts)
            style = "-o" if i == 0 else "--s"
            color = "C0" if i == 0 else COLORS.get(label.split()[0], f"C{i + 3}")
            ax.plot(xs, ys, style, label=label, color=color, linewidth=2.2 if i == 0 else 1.4)
            for x, y in pts:
                ax.annotate(f"{y:.0f}" if y >= 10 else f"{y:.1f}", (x, y), textcoords="offset points",
                            xytext=(0, 6), ha="center", fontsize=7)
        ax.set_title(title)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_xscale("log")
        lens = sorted({r["prompt_len"] for r in result["results"]})
        ax.set_xticks(lens, [str(n) for n in lens])
        ax.xaxis.set_minor_formatter(NullFormatter())
        values = [r[key] for _, rows in series(result) for r in rows if key in r]
        if values and max(values) > 10 * min(values):  # log time only when it spans a decade
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
        else:
            ax.set_ylim(bottom=0)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    device = result.get("device", "")
    fig.suptitle(f"quant bench: {result.get('input', '')} on {device}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)  # never a half-written plot
    return path
