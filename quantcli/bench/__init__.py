"""quant bench: real low-bit kernels (kernels.py), measurements (latency.py), the command core (run.py)."""
