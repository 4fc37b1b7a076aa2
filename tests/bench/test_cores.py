"""bench.cores: which cores it measures, how it pairs the repetitions and judges the targets."""

from __future__ import annotations

from typing import Any

import pytest

from bench import cores
from bench.cores import Configuration


@pytest.mark.parametrize(("usable", "counts"), [(1, [1]), (2, [1, 2]), (6, [1, 2, 4, 6]), (16, [1, 2, 4, 8, 16])])
def test_it_measures_powers_of_two_and_every_core(usable: int, counts: list[int]) -> None:
    assert cores.core_counts(usable) == counts


def test_the_single_process_is_the_one_variant_with_settings() -> None:
    assert Configuration(2, "defaults").env("m") == {"SERVICE_MODEL_DIR": "m"}
    assert Configuration(2, "one process").env("m") == {"SERVICE_MODEL_DIR": "m", "SERVICE_PROCESSES": "1"}
    assert Configuration(2, "one process").key == "2-one-process"


def _server(rps: float, p50_ms: float = 4.0, p99_ms: float = 8.0, pss: float = 150.0) -> dict[str, Any]:
    """Return one configuration's measurements in one repetition, every cell at rps."""
    run = {"throughput_rps": rps, "p50_us": p50_ms * 1e3, "p99_us": p99_ms * 1e3, "errors": 0,
           "server_cpu_ms_per_request": 2.0}
    return {"pss_mb": pss, "processes": 1, "cold_start_s": 0.5,
            "cells": {f"{workload}-c{c}": dict(run) for workload, c in cores.CELLS}}


def _reps(two_cores: list[float]) -> list[dict[str, Any]]:
    """Return repetitions where one core serves 100 req/s and two cores serve two_cores[i]."""
    return [{"rep": i, "limit": {"1": {"short": 200.0, "mixed": 100.0}, "2": {"short": 400.0, "mixed": 200.0}},
             "servers": {"1-defaults": _server(100.0, p50_ms=4.0), "2-defaults": _server(rps, p50_ms=3.9, pss=200.0),
                         "2-one-process": _server(rps / 2, p50_ms=4.1)}}
            for i, rps in enumerate(two_cores)]


CONFIGURATIONS = [Configuration(1, "defaults"), Configuration(2, "defaults"), Configuration(2, "one process")]


def test_ratios_are_paired_within_a_repetition_then_the_median_taken() -> None:
    # the one-core figure moves with the machine too: each repetition's ratio is taken on its own
    reps = _reps([190.0, 150.0, 185.0])
    reps[1]["servers"]["1-defaults"] = _server(75.0)  # a slow moment for both
    summary = cores.summarise(reps, CONFIGURATIONS)
    cell = summary["2-defaults"]["cells"]["short-c8"]
    assert cell["vs_one_core"] == pytest.approx(1.9)  # median of 1.9, 2.0, 1.85
    assert cell["rps"] == 185.0 and cell["rps_per_core"] == 92.5
    assert cell["vs_limit"] == pytest.approx(185.0 / 400.0)
    assert summary["limit"] == {"1": {"short": 200.0, "mixed": 100.0}, "2": {"short": 400.0, "mixed": 200.0}}


def test_the_targets_name_what_holds_and_what_misses() -> None:
    met = {t["target"]: t["met"] for t in cores.targets(cores.summarise(_reps([190.0] * 3), CONFIGURATIONS),
                                                        CONFIGURATIONS)}
    assert met == {
        "short-c8: 2 cores / 1 core >= 1.8x req/s": True,
        "short-c32: 2 cores / 1 core >= 1.8x req/s": True,
        "mixed-c8: 2 cores / 1 core >= 1.8x req/s": True,
        "short-c32 on 2 cores >= 0.75x the in-process limit on them": False,  # 190 of 400
        "one client: p50 on 2 cores <= on 1 core (ms)": True,
        "one client: p50 on 2 cores <= the single process' (ms)": True,
        "PSS of every process <= 1.4x the single process' (MiB)": True,  # 200 against 1.4 x 150
        "short-c8 on 2 cores: p99 <= 2.5x p50": True,
    }
    slow = cores.targets(cores.summarise(_reps([150.0] * 3), CONFIGURATIONS), CONFIGURATIONS)
    assert [t["measured"] for t in slow[:3]] == [1.5, 1.5, 1.5] and not any(t["met"] for t in slow[:3])
    assert cores.targets(cores.summarise(_reps([150.0])[:1], CONFIGURATIONS[:1]), CONFIGURATIONS[:1]) == []


def test_the_report_is_a_table_by_cores_with_the_targets() -> None:
    summary = cores.summarise(_reps([190.0] * 3), CONFIGURATIONS)
    result = {"meta": {"date": "2026-12-05", "command": "python -m bench.cores", "commit": "0" * 40,
                       "machine": "a CPU, 2 usable cores", "repetitions": 3, "duration_s": 4, "client_cpus": "1"},
              "summary": summary, "targets": cores.targets(summary, CONFIGURATIONS)}
    text = cores.markdown(result)
    assert "| 2 | defaults | 1 | 3.90 | 190 (3.9 / 8.0) | 190 | 190 | 95 | 1.90 / 1.90 / 1.90 |" in text
    assert "| short-c32 on 2 cores >= 0.75x the in-process limit on them | 0.47 | 0.75 | MISSED |" in text
