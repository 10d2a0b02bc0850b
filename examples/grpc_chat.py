"""Chat with a FerrousForge server over its gRPC API, printing tokens as they come.

    ferrous serve            # with [grpc] enabled = true in the configuration
    python examples/grpc_chat.py --token "$TOKEN" --model smollm2 "Why is the sky blue?"

Ctrl-C cancels the call, which stops the generation on the server.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc

from gateway.grpcapi import ferrous_pb2 as pb
from gateway.grpcapi import ferrous_pb2_grpc as pb_grpc


async def chat(address: str, token: str, model: str, question: str, timeout: float) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.FerrousStub(channel)  # type: ignore[no-untyped-call]
        request = pb.ChatRequest(
            model=model, messages=[pb.ChatMessage(role="user", content=question)]
        )
        metadata = (("authorization", f"Bearer {token}"),)
        try:
            async for event in stub.Chat(request, metadata=metadata, timeout=timeout):
                if event.HasField("delta"):
                    print(event.delta.text, end="", flush=True)
                elif event.HasField("done"):
                    d = event.done
                    print(
                        f"\n[{d.finish_reason}: {d.usage.completion_tokens} tokens, "
                        f"{d.timings.decode_tok_s:.0f} tok/s]"
                    )
        except grpc.aio.AioRpcError as exc:
            print(f"\n{exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question")
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--token", required=True, help="a JWT or an API key")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--timeout", type=float, default=300.0, help="the call's deadline")
    args = parser.parse_args()
    return asyncio.run(chat(args.address, args.token, args.model, args.question, args.timeout))


if __name__ == "__main__":
    raise SystemExit(main())
