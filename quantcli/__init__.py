"""quantcli: post-training quantization of causal language models, one pipe-able stage at a time."""

__version__ = "0.1.0"
