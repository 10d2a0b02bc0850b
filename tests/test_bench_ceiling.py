"""The batch-ceiling benchmark runs on the graphs the converter writes."""

from __future__ import annotations

from pathlib import Path

from bench.onnx_ceiling import ffn_shape, graph_ceiling, matmul_nbits_scaling
from engine.onnx.tinydecoder import write_tiny_decoder


def test_ceiling_times_a_fast_graph_and_declines_a_plain_one(tmp_path: Path) -> None:
    fast = write_tiny_decoder(tmp_path / "fast", quantize="q4", fused=True)
    result = graph_ceiling(fast, threads=1, spinning=False, past=5, rounds=1)
    assert result["measured"] is True
    steps = result["step_ms"]
    assert isinstance(steps, dict) and set(steps) == {"1", "2", "4", "8"}
    assert all(ms > 0 for ms in steps.values())
    assert isinstance(result["batch4_speedup"], float)

    plain = write_tiny_decoder(tmp_path / "plain")
    declined = graph_ceiling(plain, threads=1, spinning=False, rounds=1)
    assert declined["measured"] is False
    assert "GroupQueryAttention" in str(declined["why"])


def test_matmul_chain_runs_at_every_row_count(tmp_path: Path) -> None:
    hidden, ffn = ffn_shape(write_tiny_decoder(tmp_path / "fast", quantize="q4", fused=True))
    result = matmul_nbits_scaling(hidden, ffn, threads=1, spinning=False, pairs=2, rounds=1)
    runs = result["run_ms"]
    assert isinstance(runs, dict) and set(runs) == {"1", "2", "4", "8"}
    assert all(ms > 0 for ms in runs.values())
