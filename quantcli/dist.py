"""Data-parallel calibration over ``torch.distributed``, launched by ``torchrun``.

Every rank runs the same command on the same model. The calibration blocks ``[N, L]`` (and the
evaluation windows of ``eval-ppl``) are cut into contiguous, deterministic shards, one per rank
(:func:`shard`); everything an algorithm decides from data is reduced across ranks before it is
used, so every rank takes the same decision and holds the same quantized layer:

* a statistic that is a mean over the rank's tokens (AWQ's ``mean|x|``, its Gram matrices
  ``XᵀX / T`` and each candidate's squared error, the driver's per-layer loss) goes through
  :func:`all_mean` (weights by the token counts);
* GPTQ's Hessians ``H = 2/n · Σ x xᵀ`` go through :func:`reduce_mean` to the rank that owns the
  linears fed by that input (owners rotate over the layer's Hessian groups); the owner runs GPTQ
  and :func:`broadcast_object` hands its codes to every rank;
* a maximum (OmniQuant's LET init ``max|x|``) through :func:`all_max`;
* OmniQuant's training steps through :func:`backward` (the global batch of the single-process
  run, each rank computing the part it holds; gradients summed, DDP style).

The world comes from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``). Without it, or with ``WORLD_SIZE=1``, the world is one process,
``torch.distributed`` is never touched and every function here returns its input unchanged, so a
single process computes exactly what it computed before this module existed. The process group is
created by :func:`bind` when the command resolves its device: NCCL for CUDA (one GPU per rank,
``cuda:LOCAL_RANK``), Gloo otherwise.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
from torch import Tensor

from quantcli.errors import InputError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place in the launch (from torchrun's environment; one process without it)."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return World()
    return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"])))


def is_main() -> bool:
    return world().main


def where() -> str:
    """``"rank 1/2: "`` under a multi-process launch, else ``""`` (prefix for error lines)."""
    w = world()
    return f"rank {w.rank}/{w.size}: " if w.size > 1 else ""


def _active() -> bool:
    return world().size > 1


def _initialised() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def bind(device: torch.device) -> torch.device:
    """This rank's device for the command's ``device``; creates the process group on first call.

    ``cuda`` becomes ``cuda:LOCAL_RANK`` with NCCL; anything else uses Gloo. One process: ``device``
    unchanged.
    """
    w = world()
    if w.size == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", w.local_rank)
        torch.cuda.set_device(device)
    if not _initialised():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            torch.distributed.init_process_group(backend)
        except Exception as exc:  # noqa: BLE001 - any failure to join is the same user-facing problem
            address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            raise InputError(
                f"cannot join the {w.size}-process {backend} group at {address} ({type(exc).__name__}: {exc}); "
                f"check torchrun's --master-addr/--master-port and that every node can reach rank 0"
            ) from None
    return device


def _device() -> torch.device:
    """Where collective buffers live: this rank's GPU under NCCL, else the CPU."""
    if _initialised() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _group_ready() -> None:
    if not _initialised():
        bind(torch.device("cpu"))


# --------------------------------------------------------------------------- shards


def bounds(count: int, rank: int | None = None, size: int | None = None) -> tuple[int, int]:
    """``[start, stop)`` of the contiguous share of ``count`` items held by ``rank`` (default: this
    rank): the first ``count % size`` ranks hold one item more."""
    w = world()
    rank = w.rank if rank is None else rank
    size = w.size if size is None else size
    base, extra = divmod(count, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard(items: Tensor | int, what: str | None = None) -> Tensor | range:
    """This rank's rows of ``items: [N, ...]`` (or its ``range`` of ``N`` indices).

    ``what`` names the items for the error raised when this rank would get none (calibration
    blocks cannot be empty on a rank; evaluation windows may be).
    """
    count = items if isinstance(items, int) else items.shape[0]
    start, stop = bounds(count)
    if what is not None and stop == start:
        raise InputError(
            f"{count} {what} cannot be shared by {world().size} ranks: give at least one per rank "
            f"(raise --nsamples or lower --nproc-per-node)"
        )
    return range(start, stop) if isinstance(items, int) else items[start:stop]


def owned(global_index: Tensor, total: int) -> tuple[Tensor, float]:
    """The local row indices of the items of ``global_index`` (indices into all ``total`` items)
    that this rank holds, and their share of ``global_index``."""
    if not _active():
        return global_index, 1.0
    start, stop = bounds(total)
    mine = global_index[(global_index >= start) & (global_index < stop)]
    return mine - start, mine.numel() / max(global_index.numel(), 1)


# --------------------------------------------------------------------------- collectives


def all_reduce_sum(t: Tensor) -> Tensor:
    """``Σ_ranks t`` (a new tensor on ``t``'s device and dtype; ``t`` itself on one process)."""
    if not _active():
        return t
    _group_ready()
    buf = t.detach().to(_device(), copy=True)
    torch.distributed.all_reduce(buf)
    return buf.to(t.device)


def all_sum(*values: float | int) -> tuple[float, ...]:
    """Sums over ranks of Python numbers (float64 on the wire), one collective for all."""
    if not _active():
        return values
    summed = all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()
    return tuple(int(s) if isinstance(v, int) else s for s, v in zip(summed, values))


def all_max(t: Tensor) -> Tensor:
    """Elementwise ``max_ranks t``."""
    if not _active():
        return t
    _group_ready()
    buf = t.detach().to(_device(), copy=True)
    torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.MAX)
    return buf.to(t.device)


def all_mean(value: T, count: int) -> T:
    """The mean over all ranks' items of a per-rank mean ``value`` (tensor or float) over ``count`` items.

    ``Σ_r count_r · value_r / Σ_r count_r``; ``value`` unchanged on one process. A rank with
    ``count = 0`` contributes nothing (its ``value`` may be anything finite).
    """
    if not _active():
        return value
    is_tensor = isinstance(value, Tensor)
    t = value if is_tensor else torch.tensor(float(value), dtype=torch.float64)
    (total,) = all_sum(int(count))
    summed = all_reduce_sum(t * count if count else torch.zeros_like(t))
    mean = summed / max(total, 1)
    return mean.to(value.dtype) if is_tensor else float(mean)


def reduce_mean(value: Tensor, count: int, total: int, dst: int) -> Tensor | None:
    """:func:`all_mean` delivered to rank ``dst`` only (``None`` on the others): ``value`` is this
    rank's mean over ``count`` items, ``total`` the items of all ranks (:func:`all_sum` of the
    counts). Half the traffic of an all-reduce, for a statistic one rank consumes (a GPTQ Hessian
    on the rank that owns its linears). One process: ``value`` unchanged."""
    if not _active():
        return value
    _group_ready()
    buf = (value * count if count else torch.zeros_like(value)).detach().to(_device(), copy=True)
    torch.distributed.reduce(buf, dst)
    return (buf / max(total, 1)).to(value.device, value.dtype) if world().rank == dst else None


def broadcast_object(obj: T, src: int) -> T:
    """Rank ``src``'s ``obj`` (any picklable value: CPU tensors, numbers, strings) on every rank."""
    if not _active():
        return obj
    _group_ready()
    box = [obj]
    torch.distributed.broadcast_object_list(box, src)
    return box[0]


def broadcast(t: Tensor, src: int = 0) -> Tensor:
    """``t`` as rank ``src`` holds it, on every rank (in place on ``t``'s storage when possible)."""
    if not _active():
        return t
    _group_ready()
    buf = t.detach().to(_device(), copy=True)
    torch.distributed.broadcast(buf, src)
    t.data.copy_(buf.to(t.device))
    return t


def barrier() -> None:
    if _active():
        _group_ready()
        torch.distributed.barrier()


def backward(loss_of: Callable[[Tensor], Tensor], batch: Tensor, total: int, params: list[Tensor]) -> float:
    """One data-parallel gradient step's backward pass over the global mini-batch ``batch``.

    ``batch``: indices into all ``total`` samples (the same on every rank); ``loss_of(idx)`` is
    the mean loss over this rank's samples ``idx`` (local indices). Each rank back-propagates its
    share of the batch mean, the gradients of ``params`` are summed over ranks (so every rank
    holds the gradient of the single-process batch loss) and the batch loss is returned. One
    process: ``loss_of(batch).backward()``.
    """
    if not _active():
        loss = loss_of(batch)
        value = loss.item()
        if value == value and abs(value) != float("inf"):
            loss.backward()
        return value
    idx, share = owned(batch, total)
    value = 0.0
    if idx.numel():
        loss = loss_of(idx) * share
        value = loss.item()
        loss.backward()
    for p in params:
        p.grad = all_reduce_sum(p.grad if p.grad is not None else torch.zeros_like(p))
    (value,) = all_sum(value)
    return value


# --------------------------------------------------------------------------- the process


def on_main(write: Callable[[], T], otherwise: Callable[[], T]) -> T:
    """``write()`` on rank 0 (it alone writes files); ``otherwise()`` on the other ranks."""
    return write() if is_main() else otherwise()


def finish() -> None:
    """Leave the process group cleanly (end of a successful command)."""
    if _initialised():
        torch.distributed.destroy_process_group()


def run(main: Callable[[], None], silence: Callable[[], None]) -> None:
    """Run the CLI ``main`` as one rank of a launch.

    One process: ``main()`` as is. Several: ranks other than 0 call ``silence()`` first (no
    stdout, no progress); an unexpected exception on a rank ends it with one line
    ``quant: error: rank R/N: <cause>`` and exit code 1, and torchrun then stops the other ranks.
    A rank that fails only because a peer went away (a collective error) exits quietly: the peer
    printed the cause.
    """
    if not _active():
        main()
        return
    if not is_main():
        silence()
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code == 0:
            finish()
        _exit(code)
    except BaseException as exc:  # noqa: BLE001 - any failure ends this rank with one line
        if not _peer_gone(exc):
            sys.stderr.write(f"quant: error: {where()}{type(exc).__name__}: {exc}\n")
        _exit(1)
    finish()


def _peer_gone(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another rank went away."""
    dist_errors = tuple(
        getattr(torch.distributed, name) for name in ("DistError", "DistBackendError", "DistNetworkError") if hasattr(torch.distributed, name)
    )
    text = str(exc).lower()
    return isinstance(exc, dist_errors) or any(k in text for k in ("gloo", "nccl", "connection closed", "connection reset"))


def _exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
