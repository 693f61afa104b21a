"""Calibration data: texts → seeded token blocks, and the capture of layer-0 inputs."""
