"""pytest hooks of the benchmark suites: the report header, the run's environment in the
benchmark json's ``machine_info["rgflow_fast"]``, and the skipped cases (with reasons) in its
``rgflow_fast_skipped``. The machinery itself is in harness.py."""
from __future__ import annotations

import harness


def pytest_report_header(config):
    return (f"rgflow_fast benchmarks: device {harness.DEVICE} ({harness.floors.device_name(harness.DEVICE)}), "
            f"sizes {harness.SIZES}, backends {harness.BACKENDS}")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["rgflow_fast"] = harness.environment()


_SKIPPED: list = []


def pytest_runtest_logreport(report):
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPPED.append({"test": report.nodeid, "reason": reason.removeprefix("Skipped: ")})


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["rgflow_fast_skipped"] = list(_SKIPPED)
