"""``inspect_bundle`` on a converted bundle, with or without ai-edge-litert."""

from __future__ import annotations

from dslo_edge.inspect import format_report, inspect_bundle
from tests.runtime_fixtures import fixture_dir


def test_inspect_reports_flex_free_mobilenet() -> None:
    report = inspect_bundle(fixture_dir() / "mobilenet", batch_size=8)
    student = report["files"]["student"]

    assert report["flex_free"] is True
    assert "DEPTHWISE_CONV_2D" in student["op_types"]["train"]
    assert student["variables"]["logits_kernel"]["kind"] == "trained"
    assert student["optimizer"]["name"] == "adam"
    if student["op_counts"] is not None:
        assert student["op_counts"]["infer"]["DEPTHWISE_CONV_2D"] == 7
        assert student["memory_estimate_bytes"] > student["bytes"]
    assert "Flex-free: yes" in format_report(report)
