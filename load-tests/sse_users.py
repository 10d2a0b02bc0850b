"""The OpenAI-compatible SSE scenario: one locust user class, ``SseChatUser`` (tags sse, mixed)."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator

from locust import HttpUser, tag, task
from locust.env import Environment
from options import Settings
from prompts import PROMPTS
from reporting import Generation, Reporter

SSE_PATH = "/v1/chat/completions"


class SseChatUser(HttpUser):
    """OpenAI-compatible streaming chat: ``POST /v1/chat/completions`` with ``stream: true``.

    Proves the HTTP surface under the same load as the WebSocket one, with the
    same per-generation numbers (``sse ttft``, ``sse itl``, ``sse tokens/s``,
    ``sse generation``); the ``POST`` row itself is the time to the response
    headers, which the server sends once the first token exists. Errors
    inside the stream (``data: {"error": …}``) are failures by code.
    """

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)  # type: ignore[no-untyped-call]  # locust
        self.settings = Settings.of(environment)
        self.rep = Reporter(environment, "sse", "sse")
        self.model_name = self.settings.model

    def wait_time(self) -> float:
        return self.settings.think()

    def on_start(self) -> None:
        if not self.model_name:
            with self.client.get(
                "/v1/models", headers=self.settings.headers(), catch_response=True
            ) as r:
                data = r.json().get("data") if r.ok else None
                if data:
                    self.model_name = data[0]["id"]
                else:
                    r.failure(f"{r.status_code} no model")

    @tag("sse", "mixed")
    @task
    def chat(self) -> None:
        body = {
            "model": self.model_name or "missing",
            "messages": [{"role": "user", "content": random.choice(PROMPTS)}],
            "max_tokens": self.settings.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        gen = Generation(sent=time.perf_counter())
        with self.client.post(
            SSE_PATH,
            json=body,
            headers=self.settings.headers(),
            stream=True,
            catch_response=True,
            timeout=self.settings.timeout,
        ) as r:
            if not r.ok:
                try:
                    code = r.json()["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    code = "?"
                gen.failure = f"{r.status_code} {code}"
                r.failure(gen.failure)
            else:
                try:
                    self._read(r.iter_content(chunk_size=None), gen)
                except OSError as exc:  # requests' errors are OSErrors
                    gen.failure = f"stream {type(exc).__name__}"
                r.success()
        gen.end = time.perf_counter()
        gen.report(self.rep)

    @staticmethod
    def _read(chunks: Iterator[bytes], gen: Generation) -> None:
        """Parse SSE events as they arrive (each is one HTTP chunk, not line-buffered)."""
        buf = b""
        for chunk in chunks:
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                data = event.removeprefix(b"data: ").strip()
                if data == b"[DONE]":
                    return
                obj = json.loads(data)
                if "error" in obj:
                    gen.failure = str(obj["error"].get("code", "?"))
                    continue
                if obj.get("usage"):
                    gen.completion_tokens = int(obj["usage"]["completion_tokens"])
                for choice in obj.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        gen.deltas.append(time.perf_counter())
                        gen.text_bytes += len(text.encode())
                    if choice.get("finish_reason"):
                        gen.finish = choice["finish_reason"]
        if gen.failure is None:
            gen.failure = "stream ended without [DONE]"
