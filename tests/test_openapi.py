"""/openapi.json is a valid OpenAPI 3.1 document that describes the routes the server has."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from openapi_spec_validator import validate

from .gateway_helpers import gateway, server_config


async def test_openapi_document_is_valid_and_matches_the_routes(
    tmp_path: Path, eos_model: Path
) -> None:
    async with gateway(server_config(tmp_path, {"eos": eos_model})) as srv:
        r = await asyncio.to_thread(httpx.get, srv.http_url + "/openapi.json")
        assert r.status_code == 200
        doc = r.json()
        validate(doc)
        paths = set(doc["paths"])
        assert {
            "/v1/generate",
            "/v1/chat",
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/embeddings",
            "/v1/models",
            "/readyz",
        } <= paths
        body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]
        assert body["content"]["application/json"]["schema"]["$ref"].endswith(
            "ChatCompletionRequest"
        )
        # Every documented route answers (not 404) on the real server.
        token = srv.gateway.auth.issue_token(sub="alice", ttl=60)
        for path, ops in doc["paths"].items():
            for method in ops:
                url = srv.http_url + path.replace("{name}", "eos")

                def call(method: str = method, url: str = url) -> httpx.Response:
                    return httpx.request(
                        method.upper(),
                        url,
                        headers={"Authorization": f"Bearer {token}"},
                        json={} if method == "post" else None,
                    )

                answer = await asyncio.to_thread(call)
                assert answer.status_code != 405 and (
                    answer.status_code != 404 or "error" in answer.json()
                ), (method, path, answer.status_code)
