"""``python -m quantcli`` (and ``torchrun --nproc-per-node N -m quantcli ...``): the ``quant`` CLI."""

import io
import os
import sys

from quantcli import dist


class _ErrorLinesOnly(io.TextIOBase):
    """stderr of ranks other than 0: only the one-line errors (``quant: ...``) get through."""

    def __init__(self, target):
        self.target, self.pending = target, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.startswith("quant: "):
                self.target.write(line + "\n")
                self.target.flush()
        return len(text)


def _silence() -> None:
    """Ranks other than 0 print nothing but their own error line: no result, progress or usage text."""
    from quantcli.cli import _console

    sys.stdout = open(os.devnull, "w")
    sys.stderr = _ErrorLinesOnly(sys.__stderr__)
    _console.err.quiet = True


def _main() -> None:
    from quantcli.cli.app import main

    main()


if __name__ == "__main__":
    dist.run(_main, _silence)
