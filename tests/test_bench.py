"""The quick bench end to end: every figure is in the JSON, with values.

Timings are never asserted: the machine is shared and the quick run is short.
"""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from dslo_edge.broker import find_mosquitto

pytest.importorskip("keras")

FIGURES = {
    "train_step",
    "dynamic_part",
    "dynamic_engine",
    "dynamic_part_floor",
    "throughput",
    "latency_p50",
    "latency_p99",
    "latency_p50_light_step",
    "latency_p99_light_step",
    "peak_rss",
    "startup",
    "wire_bytes",
    "wire_bytes_float16",
    "wire_bytes_top_k",
}


@pytest.mark.slow
@pytest.mark.skipif(find_mosquitto() is None, reason="the bench needs mosquitto")
def test_quick_bench_writes_every_figure(tmp_path) -> None:
    from dslo_edge.cli import main

    out = tmp_path / "bench"
    result = CliRunner().invoke(main, ["bench", "--quick", "--out", str(out)])

    assert result.exit_code == 0, result.output
    report = json.loads((out / "bench.json").read_text())
    assert report["quick"] is True
    assert report["command"] == "dslo-edge bench --quick"
    assert set(report["figures"]) == FIGURES
    for name, figure in report["figures"].items():
        for field in ("value", "reference", "ratio"):
            assert isinstance(figure[field], (int, float)), (name, field)
            assert math.isfinite(figure[field]), (name, field)
            assert figure[field] > 0, (name, field)
        assert isinstance(figure["met"], bool), name
        assert figure["target"], name
    for name in FIGURES:
        assert name in result.output
    daemon = report["measured"]["daemon"]
    assert daemon["exit_code"] == 0
    assert daemon["rejected"] == {}
    assert daemon["applied"] == 120
