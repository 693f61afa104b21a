"""The thin command-line layer: flags → params → one core call → one artifact path on stdout."""
