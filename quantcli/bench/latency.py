"""Latency and memory measurements of a causal LM: prefill, greedy decode, weights, KV-cache room.

Everything here takes a model and plain numbers and returns plain dicts/ints; progress goes
through an optional ``progress(message)`` callback. No rich, no files.
"""

from __future__ import annotations

import inspect
import os
import resource
import statistics
import sys
import time
import types
from typing import Callable, Generator

import torch
from torch import nn

Progress = Callable[[str], None]
Steps = Generator[object, None, object]  # yields between timed repetitions, returns the result
LENGTH_DONE = "length done"  # what a run yields after a prompt length's last repetition


def drain(steps: Steps) -> object:
    """Run ``steps`` (a generator that yields between timed repetitions) to its end; its result."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def interleave(runs: dict[str, Steps]) -> dict[str, object]:
    """Advance each of ``runs`` one step (one timed repetition) in turn until every one has
    returned; their results by name. A run that yields :data:`LENGTH_DONE` waits there until every
    live run has, so all models time a prompt length together. Models timed this way meet the same
    load on a shared machine: each repetition of one sits between repetitions of the others,
    instead of minutes apart."""
    results, live, waiting = {}, dict(runs), set()
    while live:
        for name, steps in list(live.items()):
            if name in waiting:
                continue
            try:
                if next(steps) == LENGTH_DONE:
                    waiting.add(name)
            except StopIteration as stop:
                results[name] = stop.value
                del live[name]
        if waiting >= set(live):
            waiting.clear()
    return results


# --------------------------------------------------------------------------------------------
# Devices and memory
# --------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fastest_ms(fn: Callable[[], object], reps: int) -> float:
    """Fastest of ``reps`` timed calls of ``fn`` after one untimed call, in ms (the minimum resists
    other load on a shared machine; ``fn`` synchronizes the device itself)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (packed kernel buffers included).

    Tensors sharing storage (tied embeddings) are counted once.
    """
    seen: set[tuple[str, int]] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``getrusage``; kB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int:
    """Current resident set size (psutil when present, else /proc/self/statm, else the peak)."""
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def free_memory_bytes(device: torch.device) -> int:
    """Memory free now on ``device``: GPU ``mem_get_info`` free, or the machine's available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this run: max allocated on a GPU, peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()


# --------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if get is not None else config


def _attention_geometry(config) -> tuple[int, int, int, int]:
    """``(layers, query heads, KV heads, head_dim)`` of a (text) config."""
    cfg = _text_config(config)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, heads, kv_heads, head_dim


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of KV cache per token: ``layers × kv_heads × head_dim × 2 (K and V) × dtype size``."""
    layers, _, kv_heads, head_dim = _attention_geometry(config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return layers * kv_heads * head_dim * 2 * itemsize


def kv_cache_capacity(config, budget_bytes: int, dtype: torch.dtype) -> int:
    """Tokens of KV cache (summed over the batch) that fit in ``budget_bytes`` (full attention)."""
    return tokens_in_budget(budget_bytes, kv_bytes_per_token(config, dtype))


def tokens_in_budget(budget_bytes: int, bytes_per_token: int) -> int:
    """Whole tokens of ``bytes_per_token`` each that fit in ``budget_bytes`` (0 for a negative budget)."""
    return max(0, int(budget_bytes)) // max(1, bytes_per_token)


KV_BLOCK_TOKENS = 16  # a paged KV cache's block (vLLM's default), the seed study's unit
REQUEST_TOKENS = 3000  # tokens per request in the seed study's "largest batch"


def kv_capacity_in_blocks(capacity_tokens: int, block: int = KV_BLOCK_TOKENS, request: int = REQUEST_TOKENS) -> dict:
    """Capacity in the seed study's terms: whole ``block``-token blocks, and how many requests of
    ``request`` tokens (each rounded up to whole blocks) fit at once."""
    blocks = capacity_tokens // block
    per_request = -(-request // block)
    return {"block_tokens": block, "blocks": blocks, "request_tokens": request, "max_batch": blocks // per_request}


# --------------------------------------------------------------------------------------------
# Prefill and decode
# --------------------------------------------------------------------------------------------


def _summary(values: list[float], prefix: str) -> dict:
    """``{prefix}: median, {prefix}_min, _max, _std`` of ``values`` (seconds → milliseconds), and
    ``{prefix}_reps``: every repetition in the order timed (to pair with another model's)."""
    ms = [v * 1e3 for v in values]
    return {
        prefix: statistics.median(ms),
        f"{prefix}_min": min(ms),
        f"{prefix}_max": max(ms),
        f"{prefix}_std": statistics.stdev(ms) if len(ms) > 1 else 0.0,
        f"{prefix}_reps": [round(m, 3) for m in ms],
    }


def _forward_kwargs(model: nn.Module) -> dict:
    """Ask only for the last position's logits when the model supports it (as ``generate`` does)."""
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def cache_kwarg(model: nn.Module) -> str:
    """The forward argument that takes a KV cache: ``cache`` (transformers ≥ 5.x), else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def generate_once(
    model: nn.Module, ids: torch.Tensor, gen: int, device: torch.device, make_cache: Callable[[], object] | None = None
) -> tuple[float, list[float]]:
    """Greedy-decode ``gen`` tokens after prompt ``ids: [batch, L]`` with the model's KV cache
    (``make_cache()``'s, made inside the timed prefill, else the model's default one).

    Returns ``(prefill_seconds, [seconds of each decode step])``; the prefill time includes
    picking the first token (time to first token).
    """
    extra, name = _forward_kwargs(model), cache_kwarg(model)
    synchronize(device)
    t0 = time.perf_counter()
    first = {name: make_cache()} if make_cache is not None else {}
    out = model(input_ids=ids, use_cache=True, **first, **extra)
    token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
    synchronize(device)
    prefill = time.perf_counter() - t0
    cache = out.past_key_values
    steps = []
    for _ in range(gen):
        t0 = time.perf_counter()
        out = model(input_ids=token, use_cache=True, **{name: cache}, **extra)
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        synchronize(device)
        steps.append(time.perf_counter() - t0)
        cache = out.past_key_values
    return prefill, steps


def position_kwargs(model: nn.Module, positions: torch.Tensor | None) -> dict:
    """``{"cache_position": positions}`` where the model's forward takes it (transformers 4.x, where a
    static cache is written where it says), else ``{}`` (5.x: the cache counts its own tokens)."""
    return {"cache_position": positions} if "cache_position" in inspect.signature(model.forward).parameters else {}


def greedy_step(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]:
    """``step(token [B, 1], position [1], cache) → next token [B, 1]``: one greedy decode step of
    ``model`` over a preallocated (static) KV cache, the function :func:`compiled_greedy_step`
    compiles (the argmax inside, so the compiled step ends with the token)."""
    extra, name = _forward_kwargs(model), cache_kwarg(model)
    position_names = tuple(position_kwargs(model, None))  # decided once, not per step

    def step(token: torch.Tensor, position: torch.Tensor, cache) -> torch.Tensor:
        out = model(input_ids=token, use_cache=True, **dict.fromkeys(position_names, position), **{name: cache}, **extra)
        return out.logits[:, -1].argmax(dim=-1, keepdim=True)

    return step


def compiled_greedy_step(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]:
    """:func:`greedy_step` through ``torch.compile`` (inductor, whole graph: a graph break raises).

    The KV cache is a transformers ``StaticCache`` sized once per prompt, so every step has the
    same shapes and the graph is compiled once per cache length (from the second length on with
    the length dynamic). Eager decoding spends most of a small model's step launching ops one by
    one from Python (norms, rotary, residuals, cache append); the compiled step runs them as fused
    loops, with the low-bit kernels called as they are. Compile errors surface on the first call.
    """
    step = greedy_step(model)
    # a code object of its own per model: dynamo keeps compiled graphs, their guards and its
    # automatic-dynamic shape history per code object, so models timed alongside never share them
    own = types.FunctionType(step.__code__.replace(co_name=f"greedy_step_{id(model):x}"), step.__globals__,
                             closure=step.__closure__)
    return torch.compile(own, fullgraph=True, dynamic=None)


def static_cache(model: nn.Module, max_len: int):
    """A transformers ``StaticCache`` of ``max_len`` tokens for ``model`` (dtype and device taken
    from the first keys written)."""
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_len)


def prefill_static(model: nn.Module, ids: torch.Tensor, max_len: int) -> tuple[torch.Tensor, object]:
    """Prefill ``ids: [batch, L]`` eagerly into a new static cache of ``max_len`` tokens; returns the
    first greedy token ``[batch, 1]`` and the cache, ready for :func:`greedy_step`."""
    cache = static_cache(model, max_len)
    positions = position_kwargs(model, torch.arange(ids.shape[1], device=ids.device))
    out = model(input_ids=ids, use_cache=True, **positions, **{cache_kwarg(model): cache}, **_forward_kwargs(model))
    return out.logits[:, -1].argmax(dim=-1, keepdim=True), cache


def decode_with_step(
    model: nn.Module, ids: torch.Tensor, gen: int, device: torch.device, step: Callable
) -> tuple[list[float], torch.Tensor]:
    """Prefill ``ids: [batch, L]`` eagerly into a static cache of ``L + gen`` tokens, then time
    ``gen`` greedy decode steps of ``step`` (see :func:`greedy_step`). Returns the seconds of each
    step (the prefill is not timed here: its time to first token is the eager one) and the tokens
    decoded, ``[batch, gen]``."""
    length = ids.shape[1]
    token, cache = prefill_static(model, ids, length + gen)
    steps, tokens = [], []
    for i in range(gen):
        position = torch.tensor([length + i], device=device)
        synchronize(device)
        t0 = time.perf_counter()
        token = step(token, position, cache)
        synchronize(device)
        steps.append(time.perf_counter() - t0)
        tokens.append(token)
    return steps, torch.cat(tokens, dim=1)


def _compiled_decode(model, ids, gen, reps, warmup, device, step, progress, length) -> Steps:
    """``decode_ms`` summary of the compiled step (after ``warmup`` untimed runs over a cache of the
    timed size, which compile for it: a shorter one would leave a recompile in the first timed rep),
    or ``{"error": the first line}`` when it cannot compile or run; yields after each timed rep."""
    means = []
    for i in range(max(1, warmup) + reps):
        warm = i < max(1, warmup)
        if progress:
            progress(f"prompt {length}: compiled decode, " + (f"warm-up {i + 1} (compiles on first use)" if warm else f"rep {i + 1 - max(1, warmup)}/{reps}"))
        try:
            with torch.inference_mode():
                steps, _ = decode_with_step(model, ids, gen, device, step)  # warm-ups too: the timed cache shape
        except Exception as err:  # inductor reports a missing compiler, a graph break etc. with many types
            return {"error": (str(err).strip().splitlines() or [type(err).__name__])[0][:200]}
        if not warm:
            means.append(sum(steps) / len(steps))
            yield
    return _summary(means, "decode_ms")


DECODE_KEYS = ("decode_ms", "decode_ms_min", "decode_ms_max", "decode_ms_std", "decode_ms_reps")


def choose_decode(row: dict, compiled: dict) -> None:
    """Record both decode runtimes in ``row`` (``decode_eager``, ``decode_compiled``) and make the
    faster one (by median) the row's ``decode_ms``/``decode_tok_s``, naming it in ``decode_path``."""
    eager = {k: row[k] for k in DECODE_KEYS}
    row["decode_eager"], row["decode_compiled"] = eager, compiled
    faster = "decode_ms" in compiled and compiled["decode_ms"] < eager["decode_ms"]
    row["decode_path"] = "compiled" if faster else "eager"
    if faster:
        row.update({k: compiled[k] for k in DECODE_KEYS})
        row["decode_tok_s"] = row["batch"] / (row["decode_ms"] / 1e3)


def measure_prefill_decode(*args, **kwargs) -> list[dict]:
    """:func:`prefill_decode_reps` run to its end (one model on its own)."""
    return drain(prefill_decode_reps(*args, **kwargs))


def prefill_decode_reps(
    model: nn.Module,
    prompt_lens: list[int],
    gen: int,
    batch: int,
    reps: int,
    warmup: int,
    device: str | torch.device,
    seed: int = 0,
    progress: Progress | None = None,
    configure: Callable[[int], dict] | None = None,
    profile: Callable[[int, Callable | None], dict] | None = None,
    make_cache: Callable[[], object] | None = None,
    compiled_step: Callable | None = None,
) -> Steps:
    """Time prefill and greedy decode for each prompt length on synthetic token ids (the KV cache
    from ``make_cache()`` when given, e.g. :func:`quantcli.bench.kvcache.int8_kv_cache`).

    For each ``L`` in ``prompt_lens``: ids ``[batch, L]`` drawn with ``seed``; ``warmup`` untimed
    runs (prefill + a few decode steps), then ``reps`` timed runs of prefill + ``gen`` decode steps.
    Returns one dict per length: ``prefill_ms`` (median time to first token) with ``_min/_max/_std``
    over reps, ``prefill_tok_s`` (``batch·L`` / median prefill), ``decode_ms`` (median over reps of
    the mean per-step latency) with ``_min/_max/_std``, ``decode_tok_s`` (``batch`` / median step),
    and ``peak_mem_bytes`` (GPU max allocated, or process peak RSS on CPU). ``configure(L)``, when
    given, sets the model up for length ``L`` before its runs (untimed) and returns what it chose,
    stored as the row's ``paths``. ``compiled_step`` (see :func:`compiled_greedy_step`), when
    given, also times decode through it over a static cache; the faster of the two runtimes is the
    row's ``decode_ms``, named in ``decode_path``, both kept (:func:`choose_decode`). ``profile(L,
    step)``, when given, runs after the timed reps (same configuration, ``step`` the compiled
    step where decode chose it, else None) and its result is stored as the row's ``profile``.

    A generator: it yields after every timed repetition and returns the rows, so that
    :func:`interleave` can alternate models rep by rep (:func:`measure_prefill_decode` runs it alone).
    """
    device = torch.device(device)
    vocab = _text_config(model.config).vocab_size
    rows = []
    for length in prompt_lens:
        gen_ids = torch.Generator().manual_seed(seed + length)
        ids = torch.randint(0, vocab, (batch, length), generator=gen_ids).to(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        prefills, decodes = [], []
        paths = configure(length) if configure is not None else None
        with torch.inference_mode():
            for i in range(warmup):
                if progress:
                    progress(f"prompt {length}: warm-up {i + 1}/{warmup}")
                generate_once(model, ids, min(gen, 4), device, make_cache)
        for i in range(reps):
            if progress:
                progress(f"prompt {length}: rep {i + 1}/{reps}")
            with torch.inference_mode():
                prefill, steps = generate_once(model, ids, gen, device, make_cache)
            prefills.append(prefill)
            if steps:
                decodes.append(sum(steps) / len(steps))
            yield
        row = {"prompt_len": length, "batch": batch, "gen": gen, "reps": reps, "warmup": warmup}
        if paths is not None:
            row["paths"] = paths
        row.update(_summary(prefills, "prefill_ms"))
        row["prefill_tok_s"] = batch * length / (row["prefill_ms"] / 1e3)
        if decodes:
            row.update(_summary(decodes, "decode_ms"))
            row["decode_tok_s"] = batch / (row["decode_ms"] / 1e3)
            if compiled_step is not None:
                compiled = yield from _compiled_decode(model, ids, gen, reps, warmup, device, compiled_step, progress, length)
                choose_decode(row, compiled)
        row["peak_mem_bytes"] = peak_memory_bytes(device)
        if profile is not None:
            if progress:
                progress(f"prompt {length}: profiling")
            row["profile"] = profile(length, compiled_step if row.get("decode_path") == "compiled" else None)
        rows.append(row)
        yield LENGTH_DONE
    return rows
