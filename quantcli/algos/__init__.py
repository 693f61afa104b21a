"""Block-wise algorithms: one short driver, each algorithm a module of free functions.

Every algorithm module is imported here so that each registers its layer replay
(:mod:`quantcli.algos.replay`) before any artifact is loaded; a new algorithm is added to this list.
"""

from quantcli.algos import awq, gptq, omniquant, rtn, smooth  # noqa: F401  (each registers its replay)
