"""Replay the full-precision transform a stage recorded (its search result) onto a model."""

from __future__ import annotations

from torch import nn

from quantcli.artifact import Artifact


def replay(model: nn.Module, artifact: Artifact) -> None:
    """Apply what stage ``artifact`` changed before quantizing (nothing for RTN and GPTQ)."""
    if artifact.kind == "awq":
        from quantcli.algos.awq import replay_search

        replay_search(model, artifact)
