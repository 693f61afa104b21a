"""The errors users see: each carries one line saying what is wrong and what to do.

The CLI maps every :class:`QuantCliError` to that line on stderr and a non-zero exit code;
anything else is a bug and keeps its traceback.
"""


class QuantCliError(Exception):
    """Base class: ``str(error)`` is the one line shown to the user."""

    exit_code = 2


class InputError(QuantCliError):
    """A path, model or file given by the user is missing or not what it should be."""


class ArtifactError(QuantCliError):
    """An artifact directory is corrupt, too new, or its lineage does not hold together."""


class SpecError(QuantCliError):
    """A quantization spec cannot apply (bits, group size, format)."""


class DatasetError(QuantCliError):
    """A dataset cannot be found or loaded."""


class UnsupportedArchitecture(QuantCliError):
    """The model's architecture has no entry in the architecture table."""


class NumericalError(QuantCliError):
    """A computation produced NaN or Inf (the stage stops, naming where)."""
