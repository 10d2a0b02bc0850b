"""How much memory a loaded model takes, and how much the engine may use.

The estimate is made from the GGUF header before anything is loaded, so a
model that cannot fit is refused with a typed error instead of being handed to
native code that would exhaust memory:

* weights: the file size, counted once, because llama.cpp memory-maps the file
  and every worker shares the same page-cache pages;
* per worker: the KV cache (K and V, f16, ``n_layer x n_ctx x n_embd_kv`` for
  each of ``n_seq`` sequence windows, once when the sequences share one cache),
  the logits buffer (``n_vocab x n_batch`` floats) and a fixed compute reserve.

How many sequences a worker runs at once follows from the same figures
(:func:`sequences_for`): as many windows as fit in half of the budget, up to a
cap that grows with the worker's threads.

The default budget is 80 % of the memory the kernel reports as available when
the engine starts (``MemAvailable``), which leaves room for the gateway, the
page cache and other programs.
"""

from __future__ import annotations

import os

from engine.gguf_header import GGUFHeader

__all__ = [
    "COMPUTE_RESERVE",
    "available_memory",
    "default_budget",
    "estimate_encoder_bytes",
    "estimate_model_bytes",
    "estimate_onnx_bytes",
    "folder_bytes",
    "kv_bytes_per_token",
    "sequences_for",
]

COMPUTE_RESERVE = 32 * 1024 * 1024  # llama.cpp's compute buffers for small batches
_MAX_DEFAULT_CTX = 4096


def available_memory() -> int:
    """Bytes the kernel could give us now without swapping (``MemAvailable``)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_budget() -> int:
    return int(available_memory() * 0.8)


def kv_bytes_per_token(header: GGUFHeader) -> int:
    """Bytes of f16 keys and values one position of one sequence takes."""
    arch = header.architecture
    n_layer = header.get_int(f"{arch}.block_count", 1)
    n_embd = header.get_int(f"{arch}.embedding_length", 0)
    n_head = max(1, header.get_int(f"{arch}.attention.head_count", 1))
    n_head_kv = header.get_int(f"{arch}.attention.head_count_kv", n_head) or n_head
    return 2 * n_layer * (n_embd * n_head_kv // n_head) * 2


def window(header: GGUFHeader, n_ctx: int) -> int:
    """The context window a sequence gets: ``n_ctx``, else the model's own capped at 4096."""
    return n_ctx or min(header.context_length or 2048, _MAX_DEFAULT_CTX)


def estimate_model_bytes(
    header: GGUFHeader,
    *,
    n_ctx: int,
    workers: int,
    n_batch: int = 512,
    n_seq: int = 1,
    unified: bool = False,
) -> int:
    """Bytes a model needs in ``workers`` workers, each with ``n_seq`` sequence windows."""
    ctx = window(header, n_ctx)
    n_vocab = header.array_lengths.get("tokenizer.ggml.tokens", 32000)
    kv = kv_bytes_per_token(header) * ctx * (1 if unified else max(0, n_seq))
    logits = n_vocab * min(n_batch, ctx) * 4
    return header.file_size + workers * (kv + logits + COMPUTE_RESERVE)


def sequences_for(header: GGUFHeader, *, n_ctx: int, workers: int, budget: int, cap: int) -> int:
    """Sequence windows per worker: as many as half of ``budget`` holds, 1 to ``cap``.

    Half, so that loading this model never takes all the room another model
    would need; the windows are what grows with concurrency, the weights are
    shared by every worker and counted once.
    """
    per_seq = kv_bytes_per_token(header) * window(header, n_ctx) * max(1, workers)
    fixed = estimate_model_bytes(header, n_ctx=n_ctx, workers=workers, n_seq=0)
    room = budget // 2 - fixed
    return max(1, min(cap, room // max(1, per_seq)))


def folder_bytes(folder: str) -> int:
    """Bytes of every file under ``folder`` (a model folder's weights, tokenizer, configs)."""
    from pathlib import Path

    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def estimate_encoder_bytes(folder: str, *, workers: int) -> int:
    """Bytes an ONNX encoder folder needs in ``workers`` workers: weights each, no cache."""
    return workers * (folder_bytes(folder) + COMPUTE_RESERVE)


def estimate_onnx_bytes(
    folder: str, *, n_ctx: int, workers: int, n_seq: int, prefix_cache: int = 0
) -> int:
    """Bytes an ONNX decoder folder needs in ``workers`` workers.

    onnxruntime reads the weights into each worker's memory (no sharing), each
    sequence holds an f32 KV cache of up to ``n_ctx`` positions, and each
    worker may keep up to ``prefix_cache`` bytes of finished sequences' cache.
    """
    import json
    from pathlib import Path

    root = Path(folder)
    weights = folder_bytes(folder)
    try:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    n_layer = int(config.get("num_hidden_layers", 0) or 0)
    n_head = int(config.get("num_attention_heads", 1) or 1)
    kv_heads = int(config.get("num_key_value_heads", n_head) or n_head)
    hidden = int(config.get("hidden_size", 0) or 0)
    head_dim = int(config.get("head_dim", hidden // n_head) or 0)
    ctx = n_ctx or min(int(config.get("max_position_embeddings", 2048) or 2048), 4096)
    kv = 2 * n_layer * ctx * kv_heads * head_dim * 4 * max(1, n_seq)
    return workers * (weights + kv + prefix_cache + COMPUTE_RESERVE)
