"""One generation through the engine, shared by every surface (WebSocket, native, Ollama, OpenAI).

The surfaces only translate: each turns its own request shape into a call to
:func:`prepare` (which resolves and loads the model and applies its Modelfile
defaults) and consumes :func:`run` (engine events, with the gateway's metrics
recorded on the way). Nothing else talks to ``EngineClient.generate``, so
every surface gets the same sampling defaults, limits, metrics and
cancellation: closing the iterator of :func:`run` cancels the generation in
the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, Iterator, Sequence
from typing import TYPE_CHECKING, Literal

import msgspec

from engine import ChatMessage, GenerateRequest, GenerationDone, SamplingParams, TokenDelta
from engine.images import for_vision_model
from engine.interface import StartCallback, WaitCallback
from engine.logprobs import TokenLogprob
from engine.prompts import MAX_IMAGES
from engine.requests import Embeddings, FinishReason, ToolFunction, new_request_id
from gateway.auth import Principal
from gateway.models import ResolvedModel, seed_messages
from gateway.quotas import Quota
from gateway.scopes import ADMIN
from protocol import messages as m
from protocol.errors import (
    BadRequest,
    Cancelled,
    EngineError,
    FerrousError,
    Overloaded,
    Stalled,
    TooLarge,
    error_from_code,
)
from protocol.messages import MAX_PRIORITY, MIN_PRIORITY

if TYPE_CHECKING:
    from gateway.interface import Gateway

__all__ = [
    "Prepared",
    "ToolUse",
    "drain",
    "format_options",
    "logprob_json",
    "prepare",
    "run",
    "samples",
    "sampling_for",
    "start_samples",
    "started",
    "with_seeds",
]

# Modelfile PARAMETER name -> SamplingParams field
_MODELFILE_SAMPLING = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "repeat_penalty": "repeat_penalty",
    "seed": "seed",
    "stop": "stop",
    "num_predict": "max_tokens",
}


class ToolUse(msgspec.Struct, frozen=True):
    """The tools of a chat request and how the model may use them (see engine.tools)."""

    tools: list[ToolFunction]
    choice: Literal["auto", "required", "none"] = "auto"
    name: str | None = None  # a call of this one tool is required
    parallel: bool = True

    @property
    def active(self) -> bool:
        """The answer may hold calls (so surfaces read them out of the text)."""
        return bool(self.tools) and self.choice != "none"


class Prepared(msgspec.Struct, frozen=True):
    request: GenerateRequest
    resolved: ResolvedModel
    started: float  # perf_counter when the surface received the request
    quota_key: str = ""  # whose quota it counts against (gateway.quotas)
    quota: Quota = Quota()


def sampling_for(
    options: m.Options | None,
    resolved: ResolvedModel,
    extra: dict[str, object] | None = None,
) -> SamplingParams:
    """Request options and ``extra`` fields over the model's Modelfile parameters and defaults."""
    given: dict[str, object] = {}
    if resolved.manifest is not None:
        for name, value in resolved.manifest.parameters.items():
            field = _MODELFILE_SAMPLING.get(name)
            if field is None:
                continue
            if field == "max_tokens" and isinstance(value, int) and value < 0:
                continue  # Ollama's -1 / -2: no limit
            given[field] = value
    if options is not None:
        given.update({k: v for k, v in msgspec.structs.asdict(options).items() if v is not None})
    if extra:
        given.update({k: v for k, v in extra.items() if v is not None})
    try:
        return msgspec.convert(given, SamplingParams)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid sampling options: {exc}") from None


def format_options(fmt: object) -> dict[str, object]:
    """Sampling fields for a structured-output request: ``"json"`` or a JSON Schema (a dict)."""
    if fmt is None or fmt == "":
        return {}
    if fmt == "json":
        return {"json": True}
    if isinstance(fmt, dict):
        try:
            return {"json_schema": json.dumps(fmt)}
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"format: the JSON schema cannot be encoded: {exc}") from None
    raise BadRequest('format must be "json" or a JSON schema object')


async def for_vision(messages: list[ChatMessage]) -> list[ChatMessage]:
    """``messages`` with their images checked and sized for a vision language model (in
    a thread: decoding is work); TooLarge past the images one prompt shows. The worker
    refuses images for a model that reads none."""
    if not any(x.images for x in messages):
        return messages
    total = sum(len(x.images or ()) for x in messages)
    if total > MAX_IMAGES:
        raise TooLarge(f"{total} images; one prompt shows at most {MAX_IMAGES}")
    out: list[ChatMessage] = []
    n = 0
    for x in messages:
        if not x.images:
            out.append(x)
            continue
        sized = []
        for data in x.images:
            try:
                sized.append(await asyncio.to_thread(for_vision_model, data))
            except FerrousError as exc:
                raise type(exc)(f"image {n}: {exc.message}") from None
            n += 1
        out.append(msgspec.structs.replace(x, images=sized))
    return out


def with_seeds(resolved: ResolvedModel, messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """A stateless chat: the model's SYSTEM (unless the client sent one) and MESSAGEs first."""
    seeds = seed_messages(resolved)
    if any(x.role == "system" for x in messages):
        seeds = [x for x in seeds if x.role != "system"]
    return [*seeds, *messages]


async def prepare(
    gateway: Gateway,
    principal: Principal,
    model: str,
    *,
    prompt: str | None = None,
    messages: Sequence[ChatMessage] | None = None,
    options: m.Options | None = None,
    extra: dict[str, object] | None = None,
    keep_alive: float | None = None,
    token_ids: bool = False,
    request_id: str | None = None,
    seed: bool = True,
    started: float | None = None,
    priority: int = 0,
    tools: ToolUse | None = None,
    adapters: list[m.AdapterChoice] | None = None,
) -> Prepared:
    """Load the model if needed and build the engine request (raises FerrousError).

    ``priority`` is what the client asked for; the request gets it capped by
    what the principal may use (:func:`effective_priority`).
    """
    t0 = started if started is not None else time.perf_counter()
    if gateway.draining:
        raise Overloaded("the server is shutting down")
    resolved = await gateway.ensure_model(principal, model, keep_alive)
    sampling = sampling_for(options, resolved, extra)
    limits = gateway.config.limits
    quota_key, quota = gateway.quota_for(principal)
    if tools is not None and messages is None:
        raise BadRequest("tools need chat messages")
    if messages is not None:
        chat = with_seeds(resolved, messages) if seed else list(messages)
        request = GenerateRequest(
            model=resolved.key,
            messages=chat,
            sampling=sampling,
            request_id=request_id or new_request_id(),
            token_ids=token_ids,
            truncate=True,
            max_prompt_tokens=limits.max_prompt_tokens,
            keep_alive=keep_alive,
            tenant=fair_share_key(principal),
            priority=effective_priority(principal, priority),
            weight=quota.weight,
        )
        if tools is not None:
            request = msgspec.structs.replace(
                request,
                tools=tools.tools or None,
                tool_choice=tools.choice,
                tool_name=tools.name,
                parallel_tool_calls=tools.parallel,
            )
    else:
        request = GenerateRequest(
            model=resolved.key,
            prompt=prompt or "",
            sampling=sampling,
            request_id=request_id or new_request_id(),
            token_ids=token_ids,
            max_prompt_tokens=limits.max_prompt_tokens,
            keep_alive=keep_alive,
            tenant=fair_share_key(principal),
            priority=effective_priority(principal, priority),
            weight=quota.weight,
        )
    chosen = resolved.adapters
    if adapters is not None:  # the request's own choice replaces the model's
        chosen = await gateway.models.adapters_for(resolved, adapters, principal.tenant)
    if chosen:
        request = msgspec.structs.replace(request, adapters=list(chosen))
    return Prepared(request, resolved, t0, quota_key, quota)


def effective_priority(principal: Principal, requested: int) -> int:
    """The priority a request runs at: what it asked for, capped by its credential's class.

    Administrators may use any class; others up to their JWT ``priority``
    claim or API key's priority (0 unless granted). Lower classes are always
    allowed: a client may mark its own background work.
    """
    cap = MAX_PRIORITY if ADMIN in principal.scopes else principal.max_priority
    return max(MIN_PRIORITY, min(requested, cap))


def fair_share_key(principal: Principal) -> str:
    """Whose turn a waiting request takes: its tenant's, else its user's (one-tenant servers)."""
    return f"t:{principal.tenant}" if principal.tenant else f"u:{principal.user}"


async def run(
    gateway: Gateway,
    prepared: Prepared,
    *,
    on_wait: WaitCallback | None = None,
    on_start: StartCallback | None = None,
) -> AsyncGenerator[TokenDelta | GenerationDone, None]:
    """Engine events of one generation, with metrics. Close it early to cancel.

    ``on_wait(position, wait_s)`` is awaited while the request waits for room
    and whenever its place changes; ``on_start()`` when it is admitted
    (see :meth:`engine.client.EngineClient.generate`).

    The task consuming it is registered with the gateway while it runs, so a
    shutdown can cancel generations of every surface after its grace period.
    """
    metrics = gateway.metrics
    tenant = metrics.tenant_label(prepared.request.tenant or "")
    model = prepared.request.model
    try:
        lease = await gateway.quotas.admit(prepared.quota_key, prepared.quota)
    except FerrousError as exc:
        metrics.refusals.labels(exc.code.value, tenant, model).inc()
        raise
    used = 0
    metrics.generations.inc()
    task = asyncio.current_task()
    if task is not None:
        gateway.running.add(task)
    last = 0.0
    try:
        asked = time.perf_counter()

        async def admitted() -> None:
            waited = time.perf_counter() - asked
            metrics.queue_wait.labels(model, tenant).observe(waited)
            if on_start is not None:
                await on_start()

        events_of = gateway.engine.generate(prepared.request, on_wait=on_wait, on_start=admitted)
        async with contextlib.aclosing(events_of) as events:
            seen = False
            try:
                async for ev in events:
                    seen = True
                    if isinstance(ev, TokenDelta):
                        now = time.perf_counter()
                        if last:
                            metrics.itl.labels(model).observe(now - last)
                        else:
                            metrics.ttft.labels(model).observe(now - prepared.started)
                        last = now
                    else:
                        u = ev.usage
                        metrics.tokens.labels(model).inc(u.completion_tokens)
                        metrics.cached_tokens.labels(model).inc(u.cached_tokens)
                        reason = ev.error.code if ev.error else ev.finish_reason.value
                        metrics.finished.labels(model, tenant, reason).inc()
                        count = metrics.tenant_tokens
                        count.labels(tenant, model, "prompt").inc(u.prompt_tokens - u.cached_tokens)
                        count.labels(tenant, model, "cached").inc(u.cached_tokens)
                        count.labels(tenant, model, "completion").inc(u.completion_tokens)
                        used = u.prompt_tokens + u.completion_tokens
                    yield ev
            except Overloaded as exc:
                if not seen:  # the model's queue is full
                    metrics.refusals.labels(exc.code.value, tenant, model).inc()
                raise
    finally:
        lease.release(used)
        metrics.generations.dec()
        if task is not None:
            gateway.running.discard(task)
            # A cancelled task's exception keeps this frame, which would keep the
            # task: a cycle holding the whole session until a full collection.
            del task


class Outcome(msgspec.Struct, frozen=True):
    """A whole answer: what every surface's non-streaming path returns."""

    text: str
    token_ids: list[int]
    done: GenerationDone
    logprobs: list[TokenLogprob] | None = None  # one per token, when the request asked


def logprob_json(lp: TokenLogprob) -> dict[str, object]:
    """One token's log-probability as OpenAI and Ollama write it (``token``, ``bytes``…)."""
    return {
        "token": lp.piece.decode("utf-8", "replace"),
        "logprob": lp.logprob,
        "bytes": list(lp.piece),
        "top_logprobs": [
            {
                "token": t.piece.decode("utf-8", "replace"),
                "logprob": t.logprob,
                "bytes": list(t.piece),
            }
            for t in lp.top
        ],
    }


def raise_if_failed(done: GenerationDone) -> None:
    """The one mapping from how a generation ended to the error a surface reports.

    An error the engine named is raised as itself; ``cancelled`` as
    :class:`Cancelled` (HTTP 499), ``stalled`` (its reader stopped reading) as
    :class:`Stalled` (504), a bare ``error`` as :class:`EngineError`. ``stop``
    and ``length`` return. Every surface answers the same way for the same end.
    """
    if done.error is not None:
        raise error_from_code(done.error.code, done.error.message, retryable=done.error.retryable)
    reason = done.finish_reason
    if reason is FinishReason.CANCELLED:
        raise Cancelled("the generation was cancelled")
    if reason is FinishReason.STALLED:
        raise Stalled("the generation stalled")
    if reason is FinishReason.ERROR:
        raise EngineError("the generation failed")


async def collect(gateway: Gateway, prepared: Prepared) -> Outcome:
    """Run a generation to its end and return the whole answer (raises how it failed)."""
    return await drain(run(gateway, prepared))


@contextlib.contextmanager
def tracked_work(gateway: Gateway) -> Iterator[None]:
    """A request's work that is not a generation (embeddings, transcriptions), held to
    the same rules: refused while the server drains, and its task registered with the
    gateway so a shutdown cancels it after the grace period."""
    if gateway.draining:
        raise Overloaded("the server is shutting down")
    task = asyncio.current_task()
    if task is not None:
        gateway.running.add(task)
    try:
        yield
    finally:
        if task is not None:
            gateway.running.discard(task)


async def embed(
    gateway: Gateway,
    principal: Principal,
    model: str,
    inputs: Sequence[str | bytes],
    *,
    truncate: bool = True,
    keep_alive: float | None = None,
) -> tuple[Embeddings, float]:
    """Embed ``inputs`` with ``model`` (and how long loading it took, in seconds):
    what every surface's embedding route calls. A ``bytes`` input is an image (an
    encoded file, for an image and text embedding model); vectors come in input order.

    Like a generation: refused while the server drains, counted in the
    metrics, and registered with the gateway so a shutdown cancels it after
    its grace period.
    """
    with tracked_work(gateway):
        t0 = time.perf_counter()
        resolved = await gateway.ensure_model(principal, model, keep_alive)
        load_s = time.perf_counter() - t0
        texts = [x for x in inputs if isinstance(x, str)]
        images = [x for x in inputs if isinstance(x, bytes)]
        result = await gateway.engine.embed(
            resolved.key, texts, truncate=truncate, keep_alive=keep_alive, images=images
        )
    if images and texts:  # texts' vectors come first: put them back in input order
        by_kind = {
            str: iter(result.vectors[: len(texts)]),
            bytes: iter(result.vectors[len(texts) :]),
        }
        vectors = [next(by_kind[type(x)]) for x in inputs]
        result = Embeddings(vectors, result.prompt_tokens, result.model)
    gateway.metrics.embedded.labels(resolved.key).inc(len(inputs))
    gateway.metrics.embedding_tokens.labels(resolved.key).inc(result.prompt_tokens)
    return result, load_s


async def started(
    gateway: Gateway, prepared: Prepared
) -> AsyncGenerator[TokenDelta | GenerationDone, None]:
    """:func:`run`, after waiting for its first event.

    Streaming surfaces call this before they send a status line, so a request
    the engine refuses (a prompt too long for the context, an invalid schema)
    is still answered with a plain 4xx rather than an error inside a 200 stream.
    """
    events = run(gateway, prepared)
    try:
        first = await anext(events)
    except BaseException:
        await events.aclose()
        raise

    async def chained() -> AsyncGenerator[TokenDelta | GenerationDone, None]:
        try:
            yield first
            async for ev in events:
                yield ev
        finally:
            await events.aclose()

    return chained()


MAX_SAMPLES = 16  # ``n`` on the OpenAI surface


def samples(prepared: Prepared, n: int) -> list[Prepared]:
    """``n`` samples of one request: ids ``<id>-<i>``, seeds ``seed + i`` when one is set."""
    if n == 1:
        return [prepared]
    out = []
    for i in range(n):
        sampling = prepared.request.sampling
        if sampling.seed is not None:
            sampling = msgspec.structs.replace(sampling, seed=(sampling.seed + i) % 2**32)
        request = msgspec.structs.replace(
            prepared.request, request_id=f"{prepared.request.request_id}-{i}", sampling=sampling
        )
        out.append(msgspec.structs.replace(prepared, request=request))
    return out


async def start_samples(
    gateway: Gateway, prepared: Sequence[Prepared]
) -> list[AsyncGenerator[TokenDelta | GenerationDone, None]]:
    """Start several samples of one prompt so that the prompt is read once.

    The first starts alone; once it has produced its first token (its prompt
    is read), the others start, and the engine gives each a copy of the
    first one's keys and values for the shared prompt instead of reading it
    again (engine prefix sharing). Raises how any of them failed to start,
    leaving none running.
    """
    first = await started(gateway, prepared[0])
    results = await asyncio.gather(
        *(started(gateway, p) for p in prepared[1:]), return_exceptions=True
    )
    gens = [first, *(r for r in results if not isinstance(r, BaseException))]
    failed = next((r for r in results if isinstance(r, BaseException)), None)
    if failed is not None:
        for gen in gens:
            await gen.aclose()
        raise failed
    return gens


async def drain(events: AsyncGenerator[TokenDelta | GenerationDone, None]) -> Outcome:
    """Read a started generation to its end (raises how it failed)."""
    parts: list[str] = []
    ids: list[int] = []
    lps: list[TokenLogprob] | None = None
    async with contextlib.aclosing(events):
        async for ev in events:
            if isinstance(ev, TokenDelta):
                parts.append(ev.text)
                ids.extend(ev.token_ids or ())
                if ev.logprobs is not None:
                    lps = [*(lps or []), *ev.logprobs]
            else:
                raise_if_failed(ev)
                return Outcome("".join(parts), ids, ev, lps)
    raise EngineError("the generation ended without a result")
