"""Byte-level mutation shared by the live WebSocket and HTTP fuzz tests."""

from __future__ import annotations

import random

__all__ = ["mutate_bytes"]


def mutate_bytes(data: bytes, rng: random.Random, specials: bytes) -> bytes:
    """One to four random edits of ``data``: bit flips, bytes set to one of ``specials``
    (the bytes that matter to the format under test), deletions, random insertions,
    duplicated runs, truncation."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(max(len(buf), 1))
        op = rng.choice(["flip", "set", "delete", "insert", "dup", "truncate"])
        if op == "flip" and buf:
            buf[i] ^= 1 << rng.randrange(8)
        elif op == "set" and buf:
            buf[i] = rng.choice(specials)
        elif op == "delete":
            del buf[i : i + rng.randint(1, 8)]
        elif op == "insert":
            buf[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == "dup":
            buf[i:i] = buf[i : i + rng.randint(1, 16)]
        else:
            del buf[i:]
    return bytes(buf)
