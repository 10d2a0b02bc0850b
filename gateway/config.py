"""Server configuration: what :class:`ServerConfig` holds, its defaults and ranges.

Every section is a msgspec struct that refuses unknown keys, so a misspelt
setting is an error rather than a silently ignored one. How a configuration
is built from defaults, the TOML file, ``FERROUS_*`` variables and CLI
overrides, and shown back redacted, is :mod:`gateway.configload`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from engine.store.sources import CatalogEntry
from gateway.quotas import Quota
from protocol.errors import ErrorCode, FerrousError

__all__ = [
    "AuthConfig",
    "BrowserConfig",
    "ConfigError",
    "LimitsConfig",
    "LogConfig",
    "ModelEntry",
    "OnnxConfig",
    "ServerConfig",
    "SourcesConfig",
    "ferrous_home",
    "parse_size",
    "private_home",
]

ENV_PREFIX = "FERROUS_"
HOME_ENV = "FERROUS_HOME"
CONFIG_FILE = "config.toml"
REDACTED = "***"

Algorithm = Literal["HS256", "RS256", "ES256"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
Positive = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
PositiveSeconds = Annotated[float, msgspec.Meta(gt=0.0)]
NonNegativeSeconds = Annotated[float, msgspec.Meta(ge=0.0)]
PerSecond = Annotated[float, msgspec.Meta(ge=0.0)]
ModelName = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


def _default_algorithms() -> list[Algorithm]:
    return ["HS256"]


class AuthConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    secret_file: str = ""  # HS256 secret; "" = FERROUS_HOME/secret (created on first run, 0600)
    algorithms: Annotated[list[Algorithm], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=_default_algorithms
    )
    public_key_file: str = ""  # PEM public key for RS256/ES256
    jwks_file: str = ""  # JWKS JSON file for RS256/ES256
    audience: str = ""  # "" = not checked
    issuer: str = ""  # "" = not checked
    leeway: NonNegativeSeconds = 30.0
    tenant_claim: Annotated[str, msgspec.Meta(min_length=1)] = "tenant"
    api_keys_file: str = ""  # "" = FERROUS_HOME/api_keys.json (hashed keys)
    ticket_ttl: PositiveSeconds = 30.0
    max_tickets_per_user: Positive = 32  # outstanding browser tickets per (tenant, user)
    # Tokens whose exp lies further than this after their iat (or now) are refused.
    max_token_lifetime: NonNegativeSeconds = 30 * 86400.0  # 0 = no limit
    # Ollama and OpenAI clients on loopback (no proxy headers, no browser Origin outside
    # the allow-list) need no credential, as with Ollama; false for shared machines.
    loopback_without_token: bool = True
    ollama_loopback_without_token: bool = False  # older opt-in, now implied by the above


class LimitsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    max_frame_bytes: Positive = 1024 * 1024
    max_concurrent_generations: Positive = 8  # per session
    max_prompt_tokens: Positive = 8192
    max_conversations: Positive = 64  # kept per user (and tenant); least recently used dropped
    # Text and images one conversation keeps; past it its oldest messages go.
    max_conversation_bytes: Positive = 8 * 1024 * 1024
    max_stored_responses: Positive = (
        256  # Responses API answers kept per user, for previous_response_id
    )
    heartbeat_interval: PositiveSeconds = 20.0
    max_sessions: Positive = 10000
    max_body_bytes: Positive = 8 * 1024 * 1024  # HTTP request bodies
    # Seconds a worker may spend rendering, tokenizing and truncating one prompt
    # (everyone on that worker waits meanwhile); past it the request is too_large.
    prompt_prepare_timeout: PositiveSeconds = 2.0
    # Generations that may wait for a sequence slot of one model (beyond, overloaded);
    # they start by priority, then in turns between tenants (users without tenants).
    max_queued_generations: Positive = 256
    # Slow and hostile clients. A connection must send its complete HTTP request
    # head within handshake_timeout and, once upgraded, its hello within
    # hello_timeout, or it is closed: an idle socket costs a file descriptor and
    # memory whoever holds it. 0 turns a timeout off.
    handshake_timeout: NonNegativeSeconds = 10.0
    hello_timeout: NonNegativeSeconds = 10.0
    # WebSocket connections open at once per client address and per user (tenant
    # and user); more are refused with 429 before the upgrade. 0 = unlimited.
    max_connections_per_ip: NonNegative = 0
    max_connections_per_user: NonNegative = 0
    # WebSocket handshakes per second per client address (a token bucket of
    # handshake_burst); more are refused with 429 and Retry-After. 0 = unlimited.
    handshake_rate: PerSecond = 0.0
    handshake_burst: Positive = 100
    # Session resume: after a dropped connection (not a close the client asked for)
    # the session, its generations and a replay buffer of what it was sent are kept
    # this long for a client to reconnect with its resume token. 0 turns resume off.
    resume_window: NonNegativeSeconds = 30.0
    # Bytes of sent messages kept per generation for a resume (finished generations
    # share one more such budget); a generation nobody reads pauses when it is full.
    resume_buffer_bytes: Positive = 256 * 1024
    # Sessions one user (in a tenant) may leave detached at once; the oldest goes first.
    max_detached_sessions: Positive = 16


class BrowserConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Which web pages may talk to the server, and under which host names (gateway.origins)."""

    # Extra origins allowed besides the server's own and loopback ones on any port:
    # "https://app.example", "https://*.example", or "*" for any.
    origins: list[str] = msgspec.field(default_factory=list)
    # Extra Host header names besides loopback names, IP literals, the bound host and
    # this machine's name: "chat.example", ".example" (and subdomains), or "*" for any.
    hosts: list[str] = msgspec.field(default_factory=list)


class SourcesConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What network clients may ask the server to pull or import (gateway.models)."""

    # Schemes a remote pull may use besides catalog and store names.
    schemes: list[Literal["https", "http", "hf", "pypi", "tiny"]] = msgspec.field(
        default_factory=lambda: ["https", "hf", "pypi", "tiny"]
    )
    # Directories whose files an admin may import over the network (resolved, symlinks
    # included: the real path must stay inside). Empty: local files only from the CLI.
    local_dirs: list[str] = msgspec.field(default_factory=list)
    # Pulls connect only to public addresses, on every redirect hop, unless the host,
    # host:port, address or CIDR network is listed here ("127.0.0.1:8080", "10.0.0.0/8").
    allow_hosts: list[str] = msgspec.field(default_factory=list)
    max_pull_bytes: int | str = "64GiB"  # the largest file one pull may download
    partial_quota: int | str = "128GiB"  # unfinished downloads together; 0 = unlimited
    partial_max_age: float | str = "168h"  # untouched partial downloads are removed after this
    # Video analyses may name a url (fetched by the server) for callers with models:write;
    # those fetches reach public addresses plus these, never allow_hosts.
    video_urls: bool = True
    video_allow_hosts: list[str] = msgspec.field(default_factory=list)


class QuotasConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Every tenant's quota (gateway.quotas), and tenants' own under ``tenants``; 0 = unlimited.

    Users without a tenant count as a tenant each. A JWT ``quota`` claim with
    the same fields overrides both for its bearer.
    """

    concurrent: NonNegative = 0  # generations running or waiting at once
    requests_per_minute: NonNegative = 0
    tokens_per_minute: NonNegative = 0  # prompt + completion tokens
    weight: Annotated[float, msgspec.Meta(gt=0, le=1000)] = 1.0  # share of turns when waiting
    tenants: dict[str, Quota] = msgspec.field(default_factory=dict)


class LogConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    level: LogLevel = "info"
    format: LogFormat = "text"


class OnnxConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """onnxruntime session options (see engine.backends.onnx_entry.OnnxOptions for the defaults' why)."""

    spinning: bool = True
    graph_optimization: Literal["all", "extended", "basic", "disabled"] = "all"
    memory_arena: bool = True
    prefix_cache_mb: NonNegative = 128
    prefix_reuse: bool = True
    # Execution providers, in order of preference: "cuda", "tensorrt", "openvino",
    # "rocm", "directml", "coreml", "cpu" (or onnxruntime's names). Those the installed
    # onnxruntime lacks are skipped with a warning; the CPU is always the last resort.
    providers: list[Annotated[str, msgspec.Meta(min_length=1, max_length=64)]] = msgspec.field(
        default_factory=lambda: ["cpu"]
    )
    tensorrt_cache: str = ""  # a directory for TensorRT's built engines ("" = none)


class StateConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """State shared by the nodes of a deployment: none by default.

    ``url``: ``redis://host:port/db``, ``rediss://`` or ``unix:///path``; empty keeps
    everything in this process (one node). With it, quotas (gateway.redisquotas),
    conversations, cancels (gateway.redisbus), the node registry (gateway.nodes)
    and resumable sessions (gateway.mirror) hold across nodes.
    """

    url: str = ""
    prefix: str = "ferrous:"  # key prefix, for several deployments on one Redis
    lease_ttl: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0  # a dead node's share lapses
    # This node's name among the others (empty: host, process id and a random part).
    node: Annotated[str, msgspec.Meta(max_length=128, pattern=r"^[A-Za-z0-9._:-]*$")] = ""
    # A node beats every ``heartbeat`` seconds; one silent for ``dead_after`` is taken
    # for dead and its resumable sessions may be taken over by the others.
    heartbeat: Annotated[float, msgspec.Meta(ge=0.05, le=60)] = 1.0
    dead_after: Annotated[float, msgspec.Meta(ge=0.2, le=600)] = 3.0


class RayConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Engine workers as Ray actors on a cluster (engine.rayhost): off unless enabled.

    ``address``: the cluster's (``host:port`` of its head; empty = ``RAY_ADDRESS``).
    Workers go where Ray finds ``num_cpus`` and ``resources``; they connect back
    to ``listen`` (this machine's address on the cluster's network; port 0 = any)
    as ``advertise`` names it. The models must be at the same paths on the nodes.
    """

    enabled: bool = False
    address: str = ""
    num_cpus: Annotated[float, msgspec.Meta(gt=0, le=1024)] = 1.0
    resources: dict[str, Annotated[float, msgspec.Meta(gt=0)]] = msgspec.field(default_factory=dict)
    listen: Annotated[str, msgspec.Meta(min_length=1)] = "127.0.0.1"
    advertise: str = ""  # "" = listen


class GrpcConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The gRPC API (gateway.grpcapi): off unless enabled, on the server's host.

    Plain HTTP/2 on its own port (gRPC does not share the HTTP/1.1 port): put TLS
    in front of it as for the main port when it leaves the machine.
    """

    enabled: bool = False
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 50051  # 0: any free port


class VoiceConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """WebSocket voice: the voice-activity model ``listen`` streams use.

    ``vad_model``: a model name in the store (pulled from the catalog on first
    use when ``auto_pull`` is on), or a path to a Silero VAD folder or file.
    """

    vad_model: Annotated[str, msgspec.Meta(min_length=1)] = "silero-vad"


class ModelEntry(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    path: Annotated[str, msgspec.Meta(min_length=1)]
    backend: str = ""  # "" = chosen by file type
    n_ctx: NonNegative = 0  # 0 = the model's own context length


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: Annotated[str, msgspec.Meta(min_length=1)] = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 11480
    home: str = ""  # "" = $FERROUS_HOME or ~/.ferrous
    workers: NonNegative = 0  # 0 = engine default
    threads_per_worker: NonNegative = 0  # 0 = engine default
    # Sequences a worker decodes together per model; 0 = by memory (GGUF: as many
    # context windows as half the memory budget holds, up to 8 per thread).
    seqs_per_worker: NonNegative = 0
    # Prompt tokens a decode step may read while other streams run: the longest a
    # running stream waits for a newcomer's prompt (chunked prefill).
    prefill_chunk: Positive = 64
    # GGUF sequences share one cache instead of a window each: long and short
    # chats take what they use, at ~30 % less throughput with many streams.
    kv_unified: bool = False
    # Read a finished chat's next turn marker into its cache while idle, so that its
    # follow-up reads only the question: "idle" (the worker and the machine idle),
    # "always" (the worker idle, whatever else runs), "off".
    read_ahead: Literal["idle", "always", "off"] = "idle"
    ring_capacity: Annotated[int, msgspec.Meta(ge=4096)] = 65536
    stall_timeout: PositiveSeconds = 30.0
    # Worker watchdog: a ping every health_interval (0 = off); a worker that leaves one
    # unanswered for health_timeout (model loads excepted) is killed and replaced.
    health_interval: NonNegativeSeconds = 2.0
    health_timeout: PositiveSeconds = 120.0
    grace_period: NonNegativeSeconds = 10.0  # in-flight generations may finish on shutdown
    # Off by default: a permessage-deflate context costs ~33 KiB of zlib state per
    # connection for the lifetime of the session (10000 idle sessions: ~330 MB).
    permessage_deflate: bool = False
    models: dict[ModelName, ModelEntry] = msgspec.field(default_factory=dict)  # loaded at start
    # Short names for sources, next to the built-in ones (``ferrous pull NAME``).
    catalog: dict[ModelName, CatalogEntry] = msgspec.field(default_factory=dict)
    auto_pull: bool = True  # pull catalog models on first use
    allow_remote_pull: bool = True  # WS/HTTP clients may pull (catalog names, https, hf, pypi)
    keep_alive: float | str = "5m"  # idle models stay loaded this long; -1 = forever, 0 = unload
    memory_budget: int | str = "auto"  # bytes ("8GiB", 8589934592) for loaded models
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    browser: BrowserConfig = msgspec.field(default_factory=BrowserConfig)
    sources: SourcesConfig = msgspec.field(default_factory=SourcesConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    quotas: QuotasConfig = msgspec.field(default_factory=QuotasConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    onnx: OnnxConfig = msgspec.field(default_factory=OnnxConfig)
    voice: VoiceConfig = msgspec.field(default_factory=VoiceConfig)
    grpc: GrpcConfig = msgspec.field(default_factory=GrpcConfig)
    state: StateConfig = msgspec.field(default_factory=StateConfig)
    ray: RayConfig = msgspec.field(default_factory=RayConfig)


class ConfigError(FerrousError):
    """The configuration is invalid; the message names the key and what was expected."""

    code = ErrorCode.BAD_REQUEST


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}


def parse_size(value: int | str, *, key: str = "memory_budget") -> int:
    """Bytes for ``8GiB``, ``512MB``, ``1000000`` (0 or ``auto`` = let the engine decide)."""
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{key} must not be negative")
        return value
    text = value.strip()
    if text.lower() == "auto":
        return 0
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ConfigError(f'{key}: {value!r} is not a size (use e.g. "8GiB", "512MB" or bytes)')
    unit = (match.group(2) or "").lower()
    base = 1024 if "i" in unit else 1000
    factor = _SIZE_UNITS[unit[:1]] if base == 1000 else base ** ("kmgt".index(unit[0]) + 1)
    return int(float(match.group(1)) * factor)


def ferrous_home(config: ServerConfig | None = None) -> Path:
    """The state directory: ``config.home``, else ``$FERROUS_HOME``, else ``~/.ferrous``."""
    if config is not None and config.home:
        return Path(config.home).expanduser()
    env_home = os.environ.get(HOME_ENV)
    if env_home:
        return Path(env_home).expanduser()
    return Path.home() / ".ferrous"


def private_home(config: ServerConfig | None = None) -> Path:
    """The state directory, created with mode 0700 (and narrowed to it when it is wider).

    It holds the secret, the hashed keys, tenants' models and their sources:
    nothing in it is for other users of the machine.
    """
    home = ferrous_home(config)
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = home.stat().st_mode & 0o777
    if mode & 0o077 and home.stat().st_uid == os.getuid():
        home.chmod(0o700)
    return home
