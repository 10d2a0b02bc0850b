"""The gRPC API with the real grpcio client: streamed generations and chats, Cancel, deadlines
as cancellation, auth in metadata, errors as status codes, embeddings and model listing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from gateway.config import GrpcConfig
from gateway.grpcapi import ferrous_pb2 as pb
from gateway.grpcapi import ferrous_pb2_grpc as pb_grpc
from gateway.server import RunningServer

from .conftest import SCRIPT
from .gateway_helpers import gateway, server_config


@pytest.fixture
async def served(
    tmp_path: Path, script_model: Path, slow_model: Path
) -> AsyncIterator[RunningServer]:
    config = server_config(
        tmp_path,
        {"script": script_model, "slow": slow_model},
        grpc=GrpcConfig(enabled=True, port=0),
    )
    async with gateway(config) as srv:
        assert srv.grpc_port
        yield srv


@pytest.fixture
async def stub(served: RunningServer) -> AsyncIterator[pb_grpc.FerrousStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        yield pb_grpc.FerrousStub(channel)  # type: ignore[no-untyped-call]


def _auth(srv: RunningServer, sub: str = "alice", **kw: object) -> tuple[tuple[str, str], ...]:
    token = srv.gateway.auth.issue_token(sub=sub, ttl=600, **kw)  # type: ignore[arg-type]
    return (("authorization", f"Bearer {token}"),)


def greedy(n: int) -> pb.Options:
    return pb.Options(temperature=0, max_tokens=n)


async def test_generate_and_chat_stream_started_deltas_done(
    served: RunningServer, stub: pb_grpc.FerrousStub
) -> None:
    md = _auth(served)
    events = [
        e
        async for e in stub.Generate(
            pb.GenerateRequest(model="script", prompt="x", options=greedy(13), id="g1"),
            metadata=md,
        )
    ]
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "started" and kinds[-1] == "done" and set(kinds[1:-1]) == {"delta"}
    assert events[0].started.id == "g1"
    deltas = [e.delta for e in events if e.HasField("delta")]
    assert "".join(d.text for d in deltas) == SCRIPT
    assert [d.seq for d in deltas] == list(range(len(deltas)))
    done = events[-1].done
    assert done.finish_reason == "length" and done.usage.completion_tokens == 13
    assert done.timings.total_ms > 0

    chat = stub.Chat(
        pb.ChatRequest(
            model="script",
            messages=[pb.ChatMessage(role="user", content="hello")],
            options=greedy(13),
        ),
        metadata=md,
    )
    text = "".join([e.delta.text async for e in chat if e.HasField("delta")])
    assert text == SCRIPT

    listed = await stub.ListModels(pb.ListModelsRequest(), metadata=md)
    names = {x.name: x.loaded for x in listed.models}
    assert names.get("script") is True and "slow" in names
    vectors = await stub.Embed(pb.EmbedRequest(model="script", input=["a", "b c"]), metadata=md)
    assert len(vectors.embeddings) == 2 and len(vectors.embeddings[0].values) > 0
    assert vectors.prompt_tokens > 0


async def test_cancel_and_deadlines_stop_the_generation(
    served: RunningServer, stub: pb_grpc.FerrousStub
) -> None:
    md = _auth(served)
    call = stub.Generate(
        pb.GenerateRequest(model="slow", prompt="x", options=greedy(100_000), id="long"),
        metadata=md,
    )
    seen = 0
    async for event in call:
        if event.HasField("delta"):
            seen += 1
            if seen == 3:
                other = _auth(served, sub="mallory")  # not alice's
                reply = await stub.Cancel(pb.CancelRequest(id="long"), metadata=other)
                assert reply.cancelled is False
                reply = await stub.Cancel(pb.CancelRequest(id="long"), metadata=md)
                assert reply.cancelled is True
        if event.HasField("done"):
            assert event.done.finish_reason == "cancelled"
            break
    else:
        raise AssertionError("the stream ended without a done")
    assert seen < 100_000

    # A deadline ends the call and the generation with it.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.Generate(
            pb.GenerateRequest(model="slow", prompt="x", options=greedy(100_000)),
            metadata=md,
            timeout=1.0,
        ):
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(200):  # the engine lets the sequence go
        if not served.gateway.running:
            break
        await asyncio.sleep(0.05)
    assert not served.gateway.running
    # The server answers the next call as ever.
    again = stub.Generate(
        pb.GenerateRequest(model="script", prompt="x", options=greedy(13)), metadata=md
    )
    assert "".join([e.delta.text async for e in again if e.HasField("delta")]) == SCRIPT


async def test_auth_and_bad_requests_are_status_codes(
    served: RunningServer, stub: pb_grpc.FerrousStub
) -> None:
    request = pb.GenerateRequest(model="script", prompt="x", options=greedy(3))
    cases = [
        ((), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer not-a-token"),), grpc.StatusCode.UNAUTHENTICATED),
        (_auth(served, scopes={"models:read"}), grpc.StatusCode.PERMISSION_DENIED),
    ]
    for metadata, code in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.Generate(request, metadata=metadata):
                pass
        assert err.value.code() == code, (metadata, err.value)
    md = _auth(served)
    for bad, code, words in (
        (pb.GenerateRequest(model="nope", prompt="x"), grpc.StatusCode.NOT_FOUND, "nope"),
        (
            pb.GenerateRequest(model="script", prompt="x", options=pb.Options(top_p=7)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "top_p",
        ),
        (
            pb.GenerateRequest(model="script", prompt="x", format="{not json"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "format",
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.Generate(bad, metadata=md):
                pass
        assert err.value.code() == code and words in (err.value.details() or ""), err.value
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListModels(pb.ListModelsRequest())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_generated_code_is_what_the_proto_gives() -> None:
    from gateway.grpcapi.generate import main

    assert main(["--check"]) == 0, "run: python -m gateway.grpcapi.generate"


async def test_the_example_client_chats(served: RunningServer) -> None:
    import os
    import sys

    repo = Path(__file__).resolve().parent.parent
    token = served.gateway.auth.issue_token(sub="alice", ttl=600)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(repo / "examples" / "grpc_chat.py"),
        "--address", f"127.0.0.1:{served.grpc_port}", "--token", token, "--model", "script",
        "hello",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert out.decode().startswith(SCRIPT)
