"""The demo's text report, from the JSON report it writes."""

from __future__ import annotations

from dslo_edge.demo import format_report


def demo_report() -> dict:
    """Return a demo report with the figures of one real run (seed 0)."""
    return {
        "dataset": "scikit-learn digits",
        "broker": "mosquitto",
        "teacher_accuracy_shifted_test": {"teacher-round-1": 0.561},
        "student_accuracy_shifted_test": {
            "before_adaptation": 0.447,
            "after_dslo": 0.781,
            "after_static_kd": 0.828,
        },
        "updates": {"sent": 115, "applied": 115, "rejected": {}},
        "latency_ms": {
            "train_step": {"p50": 0.057, "p95": 0.241},
            "end_to_end": {"p50": 2.337, "p95": 7.549},
        },
        "energy": None,
        "daemon_peak_rss_mb": 59.6,
        "duration_s": 32.6,
        "report_path": "demo-out/report.json",
    }


def test_peak_rss_line_says_mib() -> None:
    # peak_rss_mb is VmHWM in KiB divided by 1024 (dslo_edge.metrics).
    lines = format_report(demo_report()).splitlines()

    assert "daemon peak RSS 59.6 MiB; took 32.6 s" in lines
    assert "updates: sent 115, applied 115, rejected 0" in lines
