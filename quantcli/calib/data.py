"""Texts from named datasets, local files or the embedded corpus, and the token blocks cut from them.

Named datasets go through ``datasets`` and work offline when they sit in the local Hugging Face
cache; nothing is downloaded unless ``QUANTCLI_ALLOW_DOWNLOAD=1``, and an uncached one fails at
once with one line (no network retries). Local ``.txt``/``.jsonl``/``.parquet`` files (or a folder of them) are read as they are.
``builtin`` is an always-available English corpus: the Python reference documentation that ships
with every CPython (``pydoc_data.topics``), split by topic into a train and a test part.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from quantcli.errors import DatasetError, InputError

BUILTIN = "builtin"
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class HubDataset:
    path: str
    name: str | None
    column: str
    splits: dict[str, str]  # our split ("train" / "test") → the dataset's split
    data_files: dict[str, str] | None = None


NAMED = {
    "wikitext2": HubDataset("wikitext", "wikitext-2-raw-v1", "text", {"train": "train", "test": "test"}),
    "ptb": HubDataset("ptb_text_only", "penn_treebank", "sentence", {"train": "train", "test": "test"}),
    "c4": HubDataset(
        "allenai/c4",
        None,
        "text",
        {"train": "train", "test": "validation"},
        {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"},
    ),
    "pileval": HubDataset("mit-han-lab/pile-val-backup", None, "text", {"train": "validation", "test": "validation"}),
}


@dataclass
class Texts:
    texts: list[str]
    source: dict  # where they came from: dataset, split, files, sha256

    def joined(self) -> str:
        return "\n\n".join(self.texts)


def load_texts(dataset: str, split: str) -> Texts:
    """Texts of ``dataset`` (a name, a local file or folder, or ``builtin``) for ``split`` (train|test)."""
    if dataset == BUILTIN:
        return _builtin(split)
    if dataset in NAMED:
        return _hub(dataset, NAMED[dataset], split)
    path = Path(dataset)
    if path.exists():
        return _local(path)
    raise DatasetError(
        f"unknown dataset {dataset!r}: use one of {', '.join([*NAMED, BUILTIN])} or a path to .txt/.jsonl/.parquet files"
    )


def _digest(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
    return h.hexdigest()


def _builtin(split: str) -> Texts:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    chosen = [topics[k] for i, k in enumerate(keys) if (i % 5 == 4) == (split == "test")]
    return Texts(chosen, {"dataset": BUILTIN, "split": split, "origin": "pydoc_data.topics", "sha256": _digest(chosen)})


def hub_offline() -> None:
    """Keep ``huggingface_hub`` and ``datasets`` off the network unless ``QUANTCLI_ALLOW_DOWNLOAD=1``.

    Both read their offline switch once, when first imported, so the environment variables only
    act before that import; modules already imported get their switch set directly. Offline, an
    uncached dataset or model fails at once instead of retrying the network for half a minute.
    """
    if os.environ.get("QUANTCLI_ALLOW_DOWNLOAD") == "1":
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    config = sys.modules.get("datasets.config")
    if config is not None:
        config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = True


def _hub(label: str, ds: HubDataset, split: str) -> Texts:
    hub_offline()
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    hub_split = ds.splits[split]
    files = {hub_split: ds.data_files[hub_split]} if ds.data_files else None
    try:
        data = datasets.load_dataset(ds.path, ds.name, split=hub_split, data_files=files)
    except Exception as exc:  # datasets raises many kinds when offline or uncached
        raise DatasetError(
            f"dataset {label} ({ds.path}) is not available offline (not in the Hugging Face cache; nothing is downloaded): pass a local .txt/.jsonl/.parquet file or folder as --dataset, "
            f"warm the cache (HF_HOME), or set QUANTCLI_ALLOW_DOWNLOAD=1 on a machine with internet"
        ) from None
    texts = [t for t in data[ds.column] if t is not None]
    return Texts(texts, {"dataset": label, "split": hub_split, "origin": ds.path, "sha256": _digest(texts)})


def _local(path: Path) -> Texts:
    files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise DatasetError(f"{path}: no .txt, .jsonl or .parquet files inside")
    texts: list[str] = []
    for file in files:
        texts.extend(_read_file(file))
    if not any(t.strip() for t in texts):
        raise DatasetError(f"{path}: holds no text")
    return Texts(texts, {"dataset": str(path), "split": "all", "files": [str(f) for f in files], "sha256": _digest(texts)})


def _read_file(file: Path) -> list[str]:
    try:
        if file.suffix == ".txt":
            return [file.read_text(encoding="utf-8")]
        if file.suffix in (".jsonl", ".json"):
            lines = file.read_text(encoding="utf-8").splitlines()
            return [json.loads(line)["text"] for line in lines if line.strip()]
        if file.suffix == ".parquet":
            import datasets

            return [t for t in datasets.load_dataset("parquet", data_files=str(file), split="train")["text"] if t]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DatasetError(f"{file}: cannot read text ({exc.__class__.__name__}); .jsonl lines need a \"text\" field") from None
    except Exception as exc:
        raise DatasetError(f"{file}: cannot read ({exc.__class__.__name__}: {str(exc)[:120]})") from None
    raise DatasetError(f"{file}: unsupported file type; use .txt, .jsonl or .parquet")


MAX_CALIB_CHARS = 20_000_000


BOS_MODES = ("auto", "always", "never")


def bos_token(tokenizer, mode: str) -> int | None:
    """The token id put at the head of every evaluation window and calibration block, or None.

    ``auto``: the tokenizer's BOS when the tokenizer adds one by default (``tokenizer("a")``
    starts with it, or ``add_bos_token`` is set), as Gemma's do; None for tokenizers that add
    none (SmolLM2, Qwen), which keeps the plain GPTQ protocol. ``always``: the BOS token
    whatever the tokenizer does by default. ``never``: None.
    """
    if mode not in BOS_MODES:
        raise InputError(f"--bos {mode}: use one of {', '.join(BOS_MODES)}")
    bos = getattr(tokenizer, "bos_token_id", None)
    if mode == "never":
        return None
    if bos is None:
        if mode == "always":
            raise InputError("--bos always: the model's tokenizer has no BOS token; use --bos auto or never")
        return None
    if mode == "always" or getattr(tokenizer, "add_bos_token", False) is True:
        return int(bos)
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if ids and ids[0] == bos else None


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids ``[T]`` of one long text: its text tokens only, no BOS/EOS (see :func:`bos_token`)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids
    return ids[0]


def with_bos(blocks: torch.Tensor, bos: int | None) -> torch.Tensor:
    """``blocks: [N, L-1]`` with ``bos`` put in front of each → ``[N, L]``; unchanged when ``bos`` is None."""
    if bos is None:
        return blocks
    return torch.cat([blocks.new_full((blocks.shape[0], 1), bos), blocks], dim=1)


def calibration_blocks(tokenizer, texts: Texts, nsamples: int, seqlen: int, seed: int, bos: int | None = None) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens ``[N, L]`` from the joined texts, seeded.

    With ``bos`` each block is ``[bos] + (seqlen - 1)`` consecutive text tokens; without, ``seqlen``
    text tokens (the GPTQ/AWQ papers' sampling: uniform start positions over the token stream).
    """
    if nsamples < 1 or seqlen < 2:
        raise DatasetError(f"--nsamples {nsamples} / --seqlen {seqlen}: both must be positive (seqlen ≥ 2)")
    ids = tokenize(tokenizer, texts.joined()[:MAX_CALIB_CHARS])
    span = seqlen - (bos is not None)
    if ids.numel() <= span:
        raise DatasetError(
            f"dataset {texts.source['dataset']} has only {ids.numel()} tokens, fewer than --seqlen {seqlen}: lower --seqlen or add text"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - span, (nsamples,), generator=gen)
    return with_bos(torch.stack([ids[s : s + span] for s in starts.tolist()]), bos)
