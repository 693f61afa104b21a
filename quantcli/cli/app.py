"""The ``quant`` application: registers one small module per command and maps known errors to one line."""

from __future__ import annotations

import functools
import sys

import typer

from quantcli import __version__, dist
from quantcli.errors import QuantCliError

app = typer.Typer(
    name="quant",
    help="Post-training quantization of causal LMs in pipe-able stages: calibrate → awq/gptq/omniquant → pack → eval-ppl → bench.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"quantcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    """quant: one tool for post-training quantization."""


def one_line_errors(func):
    """Known errors become one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except QuantCliError as exc:
            sys.stderr.write(f"quant: error: {dist.where()}{exc}\n")
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            sys.stderr.write("quant: interrupted\n")
            raise typer.Exit(130) from None

    return wrapper


def _register() -> None:
    from quantcli.cli import awq, calibrate, eval_ppl, pack, rtn
    from quantcli.cli import omniquant
    from quantcli.cli import gptq
    from quantcli.cli import bench, demo
    from quantcli.cli import smooth

    commands = [
        ("calibrate", calibrate.calibrate_command, calibrate.EPILOG),
        ("rtn", rtn.rtn_command, rtn.EPILOG),
        ("smooth", smooth.smooth_command, smooth.EPILOG),
        ("awq", awq.awq_command, awq.EPILOG),
        ("gptq", gptq.gptq_command, gptq.EPILOG),
        ("omniquant", omniquant.omniquant_command, omniquant.EPILOG),
        ("pack", pack.pack_command, pack.EPILOG),
        ("eval-ppl", eval_ppl.eval_ppl_command, eval_ppl.EPILOG),
        ("bench", bench.bench_command, bench.EPILOG),
        ("demo", demo.demo_command, demo.EPILOG),
    ]
    for name, func, epilog in commands:
        app.command(name, epilog=epilog)(one_line_errors(func))


_register()


def main() -> None:
    app(prog_name="quant")
