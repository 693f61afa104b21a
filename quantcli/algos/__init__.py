"""Block-wise algorithms: one short driver, each algorithm a module of free functions."""
