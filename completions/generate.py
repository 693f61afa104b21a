"""Regenerate the shell completion scripts from the app: ``python completions/generate.py``."""

from pathlib import Path

from typer.completion import get_completion_script

SHELLS = {"bash": "quant.bash", "zsh": "_quant", "fish": "quant.fish"}


def script(shell: str) -> str:
    return get_completion_script(prog_name="quant", complete_var="_QUANT_COMPLETE", shell=shell)


if __name__ == "__main__":
    here = Path(__file__).parent
    for shell, name in SHELLS.items():
        (here / name).write_text(script(shell))
        print(here / name)
