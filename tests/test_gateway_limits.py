"""Per-session prompt limits and the conversation truncation policy."""

from __future__ import annotations

from pathlib import Path

from gateway.config import LimitsConfig
from protocol import messages as m
from protocol.errors import ErrorCode

from .gateway_helpers import client, gateway, server_config

GREEDY = m.Options(temperature=0.0, repeat_penalty=1.0, max_tokens=5)


async def test_prompts_over_the_token_limit_are_too_large(
    tmp_path: Path, script_model: Path
) -> None:
    config = server_config(
        tmp_path, {"script": script_model}, limits=LimitsConfig(max_prompt_tokens=40)
    )
    async with gateway(config) as server:
        token = server.gateway.auth.issue_token(sub="a")
        async with client(server, token) as c:
            await c.send(m.Generate("big", "script", "word " * 100, GREEDY))
            while True:
                msg = await c.recv()
                if isinstance(msg, m.Error):
                    break
            assert msg.code == ErrorCode.TOO_LARGE and msg.id == "big" and "40" in msg.message
            await c.send(m.Generate("small", "script", "x", GREEDY))
            _, done, _ = await c.until_done("small")
            assert done.finish_reason == "length"


async def test_long_conversations_drop_their_oldest_turns_to_fit(
    tmp_path: Path, eos_model: Path
) -> None:
    # eos_model has a 512-token context; each turn below adds ~200 tokens.
    async with gateway(server_config(tmp_path, {"eos": eos_model})) as server:
        token = server.gateway.auth.issue_token(sub="a")
        async with client(server, token) as c:
            conversation = None
            prompts = []
            for i in range(6):
                text = f"turn {i} " + "lorem ipsum " * 30
                await c.send(
                    m.Chat(f"t{i}", "eos", [m.ChatMessage("user", text)], conversation, GREEDY)
                )
                started = await c.recv()
                assert isinstance(started, m.Started)
                conversation = started.conversation
                deltas, done, _ = await c.until_done(f"t{i}")
                assert "".join(d.text for d in deltas) == "Done."
                prompts.append(done.usage.prompt_tokens)
            assert max(prompts) <= 512 - 5  # room left for the 5-token answer
            assert prompts[1] > prompts[0]  # history was kept while it fitted
