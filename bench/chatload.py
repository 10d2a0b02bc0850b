"""The client side of ``bench.scheduler``: the prompts, and one streamed chat measured.

A chat goes through the OpenAI route every server in the comparison has
(``/v1/chat/completions``, streamed, with ``stream_options.include_usage``);
its time to first token and the gaps between content chunks are measured
by the client, from the request on.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field

import httpx

__all__ = [
    "FOLLOW_UPS",
    "QUESTIONS",
    "WARM",
    "StreamResult",
    "Target",
    "chat",
    "fresh_question",
    "pct",
    "question",
]

QUESTIONS = [
    "Why is the sky blue? Explain it to a curious child.",
    "Write a short poem about a lighthouse keeper and the sea.",
    "What are three good habits for writing clean Python code?",
    "Describe how a bicycle gear system works.",
    "Give me a recipe for a simple vegetable soup.",
    "What is the difference between weather and climate?",
    "Tell a story about a robot who learns to paint.",
    "How do plants turn sunlight into food?",
    "List some tips for a first trip to the mountains.",
    "Explain what a hash table is and when to use one.",
    "Why do cats purr? Give a few possible reasons.",
    "Write a friendly email inviting a neighbour to dinner.",
    "What makes a good night's sleep, according to doctors?",
    "Describe the water cycle in a few sentences.",
    "How does a compass find north?",
    "Suggest a plan for learning to play the guitar.",
    "What was life like in a medieval village?",
    "Explain recursion with a simple example.",
    "Why do leaves change colour in autumn?",
    "Write a short dialogue between a baker and a customer.",
    "How do bees make honey?",
    "Give advice for a student starting university.",
    "What causes thunder and lightning?",
    "Describe a busy market on a Saturday morning.",
    "How does a refrigerator keep food cold?",
    "Tell a fable about a fox and a crow.",
    "What should I pack for a weekend camping trip?",
    "Explain how vaccines help the body fight illness.",
    "Why is exercise good for the brain?",
    "Write a haiku about winter rain.",
    "How do airplanes stay in the air?",
    "Describe your ideal small garden.",
]
FOLLOW_UPS = [
    "Tell me about the moon.",
    "How far away is it?",
    "Why does it change shape?",
    "Who first walked on it?",
    "What did they bring back?",
    "Could people live there?",
    "What would they need?",
    "How long would the trip take?",
    "What would they eat?",
    "Summarise our conversation.",
]


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class StreamResult:
    ttft: float = 0.0  # seconds from the request to the first content
    gaps: list[float] = field(default_factory=list)  # between content chunks
    tokens: int = 0
    text: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt, as the server reports them


@dataclass
class Target:
    """A running server: where it answers, and the headers of each tenant."""

    name: str
    base: str
    model: str
    keys: dict[str, str] = field(default_factory=dict)  # tenant -> bearer key
    priority_field: bool = False
    slots: int = 8  # sequences it decodes together at most

    def headers(self, who: str | None) -> dict[str, str]:
        key = self.keys.get(who or "")
        return {"authorization": f"Bearer {key}"} if key else {}


async def chat(
    client: httpx.AsyncClient,
    target: Target,
    messages: list[dict[str, str]],
    tokens: int,
    *,
    who: str | None = None,
    priority: int | None = None,
    ignore_eos: bool = True,
) -> StreamResult:
    body: dict[str, object] = {
        "model": target.model,
        "messages": messages,
        "max_tokens": tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": ignore_eos,
    }
    if priority is not None and target.priority_field:
        body["priority"] = priority
    for attempt in range(2):
        try:
            return await _chat_once(client, target, body, who)
        except httpx.RemoteProtocolError:
            # A keep-alive connection the server closed while idle: one retry.
            if attempt:
                raise
    raise AssertionError("unreachable")


async def _chat_once(
    client: httpx.AsyncClient, target: Target, body: dict[str, object], who: str | None = None
) -> StreamResult:
    result = StreamResult()
    t0 = last = time.perf_counter()
    chunks = 0
    parts: list[str] = []
    async with client.stream(
        "POST",
        f"{target.base}/v1/chat/completions",
        json=body,
        headers=target.headers(who),
        timeout=900,
    ) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{target.name}: {response.status_code} {await response.aread()!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            usage = event.get("usage")
            if usage:
                result.tokens = int(usage.get("completion_tokens") or 0)
                result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                details = usage.get("prompt_tokens_details") or {}
                result.cached_tokens = int(details.get("cached_tokens") or 0)
            for choice in event.get("choices") or ():
                text = (choice.get("delta") or {}).get("content")
                if not text:
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    result.ttft = now - t0
                else:
                    result.gaps.append(now - last)
                last = now
                chunks += 1
                parts.append(text)
    result.text = "".join(parts)
    if not result.tokens:
        result.tokens = chunks
    return result


WARM = [{"role": "user", "content": "Hi."}]


def question(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]


_asked = itertools.count(100)


def fresh_question(i: int) -> list[dict[str, str]]:
    """A question no server has seen before: a new reference number (always three digits)
    opens it, so no cache holds any of it past the chat template's opening, even when the
    question's text was asked before; its first token costs reading it."""
    text = QUESTIONS[i % len(QUESTIONS)]
    return [{"role": "user", "content": f"(ref {next(_asked)}) {text}"}]
