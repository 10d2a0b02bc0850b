"""ONNX execution providers: chosen per model from what onnxruntime offers, in the configured
order, the CPU the last resort; what was asked for and is missing is a warning, not an
error; ``ps`` and the metrics say what each model runs on."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import onnxruntime as ort
import pytest

from engine.backends.onnx_entry import OnnxOptions
from engine.backends.onnxsession import choose_providers, providers_for
from engine.tinyvision import write_tiny_classifier
from gateway.config import OnnxConfig
from gateway.server import RunningServer

from .gateway_helpers import gateway, server_config

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


def test_providers_follow_the_configured_order_with_the_cpu_last() -> None:
    everything = [TRT, CUDA, CPU]
    assert choose_providers(["tensorrt", "cuda"], everything) == ([TRT, CUDA, CPU], [])
    assert choose_providers(["cpu", "cuda"], everything) == ([CUDA, CPU], [])
    assert choose_providers([CUDA, "cuda"], everything) == ([CUDA, CPU], [])
    assert choose_providers(["cuda", "openvino"], [CPU]) == ([CPU], ["cuda", "openvino"])
    assert choose_providers([], [CPU]) == ([CPU], [])


def test_a_missing_provider_falls_back_to_the_cpu_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    absent = next(
        n
        for n in ("cuda", "tensorrt", "openvino")
        if n not in str(ort.get_available_providers()).lower()
    )
    with caplog.at_level(logging.WARNING, logger="ferrous.engine"):
        chosen = providers_for(OnnxOptions(providers=[absent, "cpu"]), "a model")
    assert chosen[-1] == CPU
    assert any(
        absent in r.getMessage() and "not available" in r.getMessage() for r in caplog.records
    )
    cache = providers_for(OnnxOptions(providers=["cpu"], tensorrt_cache="/tmp/x"), "m")
    assert cache == [CPU]  # the cache applies to TensorRT only


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[RunningServer]:
    models = {"colours": write_tiny_classifier(tmp_path / "colours")}
    config = server_config(
        tmp_path / "home", models, onnx=OnnxConfig(providers=["cuda", "tensorrt", "cpu"])
    )
    async with gateway(config) as srv:
        yield srv


async def test_ps_and_metrics_report_the_providers_a_model_runs_on(running: RunningServer) -> None:
    token = running.gateway.auth.issue_token(
        sub="alice", ttl=600, scopes={"generate", "models:read", "admin"}
    )
    async with httpx.AsyncClient(
        base_url=running.http_url, headers={"Authorization": f"Bearer {token}"}, timeout=60
    ) as c:
        image = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
        r = await c.post("/v1/classify", json={"model": "colours", "images": [image]})
        assert r.status_code == 200, r.text
        ps = (await c.get("/v1/ps")).json()["models"]
        [colours] = [m for m in ps if m["name"] == "colours"]
        available = ort.get_available_providers()
        expected = [p for p in (TRT, CUDA) if p in available] + [CPU]
        assert colours["providers"] == expected
        metrics = (await c.get("/metrics")).text
        assert (
            f'ferrous_model_execution_provider{{model="colours",provider="{CPU}",rank="{len(expected) - 1}"}} 1.0'
            in metrics
        )
