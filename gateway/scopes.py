"""What a caller may do: the scopes carried by tokens and API keys.

A credential grants a set of scopes; each route and message asks for one.
The set is small and fixed so an operator can read a token and know what it
allows::

    generate       generate, chat and embeddings; browser tickets
    models:read    list and show models (never paths or source URLs), ps
    models:write   pull, create, copy, delete and unload models in the caller's
                   own namespace (a tenant's, or the shared store for a
                   caller without a tenant)
    admin          everything: the shared store for every tenant, local
                   paths (under ``[sources] local_dirs``), paths and source
                   URLs in answers, models of every tenant

A JWT carries them in ``scope`` (a space-separated string, as OAuth 2.0 spells
it, RFC 8693 §4.2) or ``scopes`` (a list); an API key stores them with its
hash. A credential that names none gets :data:`DEFAULT_SCOPES`. This module is
pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

from protocol.errors import Forbidden

__all__ = [
    "ADMIN",
    "ALL_SCOPES",
    "DEFAULT_SCOPES",
    "GENERATE",
    "LOOPBACK_SCOPES",
    "MODELS_READ",
    "MODELS_WRITE",
    "allows",
    "parse_scopes",
    "require",
]

GENERATE = "generate"
MODELS_READ = "models:read"
MODELS_WRITE = "models:write"
ADMIN = "admin"
ALL_SCOPES = frozenset({GENERATE, MODELS_READ, MODELS_WRITE, ADMIN})

DEFAULT_SCOPES = frozenset({GENERATE, MODELS_READ})
"""What a credential naming no scope may do: use models, not change them."""

LOOPBACK_SCOPES = frozenset({GENERATE, MODELS_READ, MODELS_WRITE})
"""An Ollama or OpenAI client on loopback without a credential: the local owner's
everyday rights (pull, create, run) as Ollama gives them, but no server paths."""


def parse_scopes(value: object) -> frozenset[str]:
    """Scopes from a claim or a config value; ValueError names what is wrong.

    Unknown scope names are refused rather than ignored: a typo in an
    operator's token must not silently grant less, or be read as more.
    """
    if value is None:
        return DEFAULT_SCOPES
    if isinstance(value, str):
        items: Iterable[object] = value.split()
    elif isinstance(value, list | tuple | frozenset | set):
        items = value
    else:
        raise ValueError("scope must be a space-separated string or a list of strings")
    scopes: set[str] = set()
    for item in items:
        if not isinstance(item, str) or item not in ALL_SCOPES:
            raise ValueError(f"unknown scope {item!r}; known: {', '.join(sorted(ALL_SCOPES))}")
        scopes.add(item)
    if not scopes:
        raise ValueError("scope is empty")
    return frozenset(scopes)


def allows(scopes: frozenset[str], scope: str) -> bool:
    """Whether ``scopes`` grant ``scope`` (``admin`` grants everything)."""
    return scope in scopes or ADMIN in scopes


def require(scopes: frozenset[str], scope: str, action: str) -> None:
    """Raise Forbidden naming the missing scope unless ``scopes`` grant ``scope``."""
    if not allows(scopes, scope):
        raise Forbidden(f"{action} needs the {scope!r} scope, which this credential lacks")
