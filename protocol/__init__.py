"""The FerrousForge wire protocol: message types and error codes. Pure, no I/O."""

from __future__ import annotations

from .errors import ErrorCode, FerrousError

__all__ = ["PROTOCOL_VERSION", "ErrorCode", "FerrousError"]

PROTOCOL_VERSION = 1
