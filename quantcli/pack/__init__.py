"""Real quantized checkpoints: bit packing, export formats, packed HF directories."""

from quantcli.pack.checkpoint import read_packed, write_packed
from quantcli.pack.formats import DEFAULT_FORMAT, FORMATS, detect_format, formats_for, spec_from_config

__all__ = ["DEFAULT_FORMAT", "FORMATS", "detect_format", "formats_for", "read_packed", "spec_from_config", "write_packed"]
