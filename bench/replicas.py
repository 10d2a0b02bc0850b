"""What sharing state between nodes costs: quota admissions through Redis, and a cancel
that crosses nodes.

    python -m bench.replicas [--admissions 2000] [--cancels 20] [--replicas 3] [--json]

A real ``redis-server`` (on a unix socket in a temporary directory) and two
in-process nodes sharing it, each with the gRPC API on:

* **admission** — the time to admit a generation under a quota (concurrent,
  requests and tokens per minute), on one node's own book and through Redis
  (one Lua script; its release is written after the generation, off the
  request's path): p50 and p99 in milliseconds, and Redis's added p99;
* **cross-node cancel** — a generation streams from node a; ``Cancel`` goes
  to node b, whose pub/sub notice stops it on a: the time from sending the
  cancel to the stream's ``done`` on the client, p50 and max.

* **throughput** (``--replicas 3``) — one to N ``ferrous serve`` processes
  (one single-threaded worker each, the same small model) sharing Redis,
  behind nginx with the shipped configuration (``bench.nginx``): ``--streams``
  generations at once, each with its own ``X-Conversation-Id`` (the key nginx
  spreads them by), aggregate tokens per second; and one node on its own port
  without nginx, the baseline. Replicas on one machine share its cores: on 2
  cores, two single-threaded replicas can use both, a third adds nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

__all__ = ["main"]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _admissions(url: str, n: int) -> dict[str, float]:
    from gateway.quotas import LocalQuotas, Quota
    from gateway.redisquotas import RedisQuotas

    quota = Quota(concurrent=1000, requests_per_minute=10_000_000, tokens_per_minute=10**9)
    out: dict[str, float] = {}
    local = LocalQuotas()
    shared = RedisQuotas(url, prefix="bench:")
    try:
        for name, ledger in (("local", local), ("redis", shared)):
            for _ in range(20):  # warm: the connection, the script loaded on the server
                (await ledger.admit("u:warm", quota)).release()
            times = []
            for i in range(n):
                t0 = time.perf_counter()
                lease = await ledger.admit(f"u:{i % 50}", quota)
                times.append((time.perf_counter() - t0) * 1000)
                lease.release(10)
            out[f"{name}_p50_ms"] = round(statistics.median(times), 3)
            out[f"{name}_p99_ms"] = round(_pct(times, 0.99), 3)
        out["added_p99_ms"] = round(out["redis_p99_ms"] - out["local_p99_ms"], 3)
    finally:
        await shared.close()
    return out


async def _cancels(url: str, home: Path, n: int) -> dict[str, float]:
    import grpc

    from engine.tinymodels import TinyLlamaSpec, write_tiny_llama
    from gateway.config import GrpcConfig, ModelEntry, ServerConfig, StateConfig
    from gateway.grpcapi import ferrous_pb2 as pb
    from gateway.grpcapi import ferrous_pb2_grpc as pb_grpc
    from gateway.server import running_server

    spec = TinyLlamaSpec(n_embd=256, n_layer=8, n_head=4, n_ff=1024, n_ctx=4096)
    model = write_tiny_llama(home / "slow.gguf", script="Hi ö你🙂!", spec=spec)

    def node(name: str) -> ServerConfig:
        return ServerConfig(
            home=str(home / name),
            port=0,
            workers=1,
            threads_per_worker=1,
            models={"slow": ModelEntry(path=str(model))},
            state=StateConfig(url=url, prefix="bench:"),
            grpc=GrpcConfig(enabled=True, port=0),
        )

    times: list[float] = []
    async with running_server(node("a")) as a, running_server(node("b")) as b:
        ta = a.gateway.auth.issue_token(sub="bench", ttl=600)
        tb = b.gateway.auth.issue_token(sub="bench", ttl=600)
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{a.grpc_port}") as ca,
            grpc.aio.insecure_channel(f"127.0.0.1:{b.grpc_port}") as cb,
        ):
            stub_a = pb_grpc.FerrousStub(ca)  # type: ignore[no-untyped-call]
            stub_b = pb_grpc.FerrousStub(cb)  # type: ignore[no-untyped-call]
            for i in range(n):
                request = pb.GenerateRequest(
                    model="slow", prompt="x", id=f"c{i}", options=pb.Options(max_tokens=100_000)
                )
                seen, asked = 0, 0.0
                call = stub_a.Generate(
                    request, metadata=(("authorization", f"Bearer {ta}"),), timeout=60
                )
                async for event in call:
                    if event.HasField("delta"):
                        seen += 1
                        if seen == 5:
                            asked = time.perf_counter()
                            await stub_b.Cancel(
                                pb.CancelRequest(id=f"c{i}"),
                                metadata=(("authorization", f"Bearer {tb}"),),
                            )
                    elif event.HasField("done"):
                        if event.done.finish_reason != "cancelled":
                            raise RuntimeError(f"ended {event.done.finish_reason}")
                        times.append((time.perf_counter() - asked) * 1000)
                        break
    return {
        "cancel_p50_ms": round(statistics.median(times), 2),
        "cancel_max_ms": round(max(times), 2),
    }


async def _streams(base: str, n: int, tokens: int) -> float:
    """``n`` generations at once through ``base``: aggregate tokens per second."""
    import httpx

    async def one(i: int, client: httpx.AsyncClient) -> int:
        r = await client.post(
            "/v1/generate",
            json={
                "model": "bench",
                "prompt": f"stream {i}",
                "options": {"temperature": 0, "max_tokens": tokens, "ignore_eos": True},
            },
            headers={"X-Conversation-Id": f"c-{i}"},
        )
        r.raise_for_status()
        return int(r.json()["usage"]["completion_tokens"])

    async with httpx.AsyncClient(base_url=base, timeout=300) as client:
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(i, client) for i in range(n)))
        return sum(counts) / (time.perf_counter() - t0)


def _throughput(url: str, home: Path, replicas: int, streams: int, tokens: int) -> dict[str, float]:
    from bench.nginx import running_nginx
    from bench.serving import start_server, stop_server
    from engine.tinymodels import TinyLlamaSpec, write_tiny_llama

    spec = TinyLlamaSpec(n_embd=256, n_layer=8, n_head=4, n_ff=1024, n_ctx=4096)
    model = write_tiny_llama(home / "bench.gguf", script="Hi ö你🙂!", spec=spec)
    out: dict[str, float] = {}
    for n in range(1, replicas + 1):
        procs = []
        try:
            ports = []
            for i in range(n):
                env = {"FERROUS_STATE__URL": url, "FERROUS_STATE__NODE": f"r{i}"}
                proc, port = start_server(
                    model, home=str(home / f"r{n}-{i}"), env=env, ready_path="/healthz"
                )
                procs.append(proc)
                ports.append(port)
            for port in ports:  # warm: the model loaded, the code paths taken
                asyncio.run(_streams(f"http://127.0.0.1:{port}", 1, 8))
            if n == 1:
                base = asyncio.run(_streams(f"http://127.0.0.1:{ports[0]}", streams, tokens))
                out["direct_1_node_tok_s"] = round(base, 1)
            with running_nginx(home / f"nginx-{n}", ports) as lb:
                rate = asyncio.run(_streams(f"http://127.0.0.1:{lb}", streams, tokens))
            out[f"nginx_{n}_nodes_tok_s"] = round(rate, 1)
        finally:
            for proc in procs:
                stop_server(proc)
    out["nginx_overhead_ratio"] = round(out["nginx_1_nodes_tok_s"] / out["direct_1_node_tok_s"], 3)
    if replicas > 1:
        out["scaling_2_over_1"] = round(out["nginx_2_nodes_tok_s"] / out["nginx_1_nodes_tok_s"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.replicas", description=__doc__.split("\n")[0])
    parser.add_argument("--admissions", type=int, default=2000)
    parser.add_argument("--cancels", type=int, default=20)
    parser.add_argument("--replicas", type=int, default=0, help="throughput of 1..N (0: skip)")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from bench.redis_server import start_redis

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        proc = start_redis(None, home / "redis.sock")
        url = f"unix://{home / 'redis.sock'}"
        try:
            result = {
                **asyncio.run(_admissions(url, args.admissions)),
                **asyncio.run(_cancels(url, home, args.cancels)),
            }
            if args.replicas:
                result |= _throughput(url, home, args.replicas, args.streams, args.tokens)
        finally:
            proc.terminate()
            proc.wait(10)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:>16}  {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
