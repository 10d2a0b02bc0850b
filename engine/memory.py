"""How much memory a loaded model takes, and how much the engine may use.

The estimate is made from the GGUF header before anything is loaded, so a
model that cannot fit is refused with a typed error instead of being handed to
native code that would exhaust memory:

* weights: the file size, counted once, because llama.cpp memory-maps the file
  and every worker shares the same page-cache pages;
* per worker: the KV cache (K and V, f16, ``n_layer x n_ctx x n_embd_kv``),
  the logits buffer (``n_vocab x n_batch`` floats) and a fixed compute reserve.

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
    "estimate_model_bytes",
    "estimate_onnx_bytes",
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


def estimate_model_bytes(
    header: GGUFHeader, *, n_ctx: int, workers: int, n_batch: int = 512
) -> int:
    """Bytes a model needs when loaded into ``workers`` workers with ``n_ctx`` context."""
    arch = header.architecture
    n_layer = header.get_int(f"{arch}.block_count", 1)
    n_embd = header.get_int(f"{arch}.embedding_length", 0)
    n_head = max(1, header.get_int(f"{arch}.attention.head_count", 1))
    n_head_kv = header.get_int(f"{arch}.attention.head_count_kv", n_head) or n_head
    n_embd_kv = n_embd * n_head_kv // n_head
    ctx = n_ctx or min(header.context_length or 2048, _MAX_DEFAULT_CTX)
    n_vocab = header.array_lengths.get("tokenizer.ggml.tokens", 32000)
    kv = 2 * n_layer * ctx * n_embd_kv * 2
    logits = n_vocab * min(n_batch, ctx) * 4
    return header.file_size + workers * (kv + logits + COMPUTE_RESERVE)


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
    weights = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    if (root / "pooling.json").is_file():  # an encoder: no cache of any kind
        return workers * (weights + COMPUTE_RESERVE)
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
