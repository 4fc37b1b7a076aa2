"""Tests of the benchmark harness: wrk against real servers (the service, the HTTP floor), the
in-process sweep on the real model, Infinity's install path, and the report and targets on
synthetic run data."""

from __future__ import annotations

import copy
import http.client
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import infinity, inprocess, report, sessions
from bench.__main__ import REPO, backend_specs, cells, main, restarted
from bench.floor import server_settings
from bench.load import SENTIMENT, LoadError, Protocol, lua_script, parse_summary, run_wrk
from bench.servers import Server, ServerSpec, start, stop
from bench.workloads import WORKLOADS, Workload
from tests.conftest import DEFAULT_MODEL_DIR


def _need_wrk() -> None:
    if shutil.which("wrk") is None:
        pytest.fail("wrk is not installed: apt-get update && apt-get install -y wrk (.ci/run and make bench "
                    "install it)", pytrace=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Return a real service on a free loopback port, started the way the benchmark starts it."""
    _need_wrk()
    started = start(ServerSpec("onnx", {"SERVICE_THREADS": "2"}), tmp_path_factory.mktemp("logs"), timeout=60)
    yield started
    stop(started)
    assert started.process.returncode == 0, started.log_tail()


@pytest.fixture(scope="module")
def floor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Return the HTTP floor on a free loopback port, started as `python -m bench` starts it."""
    _need_wrk()
    started = start(ServerSpec("floor", {}, (sys.executable, "-m", "bench.floor")),
                    tmp_path_factory.mktemp("floor-logs"), timeout=60)
    yield started
    stop(started)
    assert started.process.returncode == 0, started.log_tail()


def test_wrk_reports_latency_throughput_and_client_cpu(server: Server) -> None:
    assert 0 < server.cold_start_s < 60 and server.label == "POSITIVE"
    cpu_before = server.cpu_seconds()
    run = run_wrk(server.port, WORKLOADS["short"], connections=1, duration_s=1)
    assert run["requests"] > 10 and run["errors"] == 0
    assert 0 < run["p50_us"] <= run["p90_us"] <= run["p99_us"] <= run["max_us"]
    assert run["throughput_rps"] > 10 and run["client_cpu_s"] > 0
    assert server.cpu_seconds() > cpu_before
    memory = server.memory_mb()
    assert 50 < memory["rss_mb"] <= memory["peak_rss_mb"]


def test_wrk_counts_error_responses(server: Server) -> None:
    run = run_wrk(server.port, Workload("empty", ("",)), connections=1, duration_s=1)
    assert run["requests"] > 0 and run["errors_status"] == run["requests"] == run["errors"]


def test_the_floor_answers_a_constant_with_the_services_default_threads(floor: Server) -> None:
    assert floor.label == "POSITIVE"
    run = run_wrk(floor.port, WORKLOADS["short"], connections=8, duration_s=1)
    assert run["requests"] > 50 and run["errors"] == 0
    # the same Waitress thread count as the service runs by default
    assert f"HTTP floor with {server_settings().threads} waitress threads" in floor.log_path.read_text()
    # it parses the body: what is not the service's JSON is a JSON 400, and the floor keeps serving
    connection = http.client.HTTPConnection("127.0.0.1", floor.port, timeout=5)
    for body in ('{"text": ', '{"texts": ["a"]}'):
        connection.request("POST", "/sentiment", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 400 and "error" in json.loads(response.read())
    connection.close()
    assert run_wrk(floor.port, WORKLOADS["long"], 1, 1)["errors"] == 0


def test_a_baseline_checkout_serves_this_checkouts_model_with_its_own_code(tmp_path: Path) -> None:
    checkout = tmp_path / "old"
    shutil.copytree(REPO / "service", checkout / "service")  # the code only: the model comes from this tree
    specs, skipped = backend_specs(["onnx", "onnx-baseline"], DEFAULT_MODEL_DIR, tmp_path, checkout)
    assert not skipped and specs["onnx-baseline"]["label"] == "this service at unknown (baseline)"
    assert specs["onnx-baseline"]["server"].env["SERVICE_MODEL_DIR"] == str(REPO / DEFAULT_MODEL_DIR)
    started = start(specs["onnx-baseline"]["server"], tmp_path, timeout=60)
    try:
        assert started.label == "POSITIVE"
        assert Path(f"/proc/{started.pid}/cwd").resolve() == checkout.resolve()
    finally:
        stop(started)


def test_the_observed_variants_log_json_and_export_every_request_to_the_sink(tmp_path: Path) -> None:
    _need_wrk()
    specs, skipped = backend_specs(["onnx-json", "onnx-traced"], DEFAULT_MODEL_DIR, tmp_path)
    assert not skipped
    for name in specs:  # one cell each: where their targets are set
        assert (specs[name]["workloads"], specs[name]["connections"]) == (("short",), (8,))
    json_logs = start(specs["onnx-json"]["server"], tmp_path, timeout=60)
    try:
        assert run_wrk(json_logs.port, WORKLOADS["short"], connections=8, duration_s=1)["errors"] == 0
    finally:
        stop(json_logs)
    lines = [json.loads(line) for line in json_logs.log_path.read_text().splitlines()]
    assert sum(line["logger"] == "service.access" for line in lines) > 10
    sink = specs["onnx-traced"]["sink"]
    traced = start(specs["onnx-traced"]["server"], tmp_path, timeout=60)
    try:
        run = run_wrk(traced.port, WORKLOADS["short"], connections=8, duration_s=1)
        assert run["errors"] == 0
    finally:
        stop(traced)  # the spans still queued are exported on the way out
    assert traced.process.returncode == 0, traced.log_tail()
    assert sink.exports > 0 and sink.bytes > 100 * run["requests"]  # every request's spans, sampled always


def test_a_baseline_must_be_a_checkout_of_this_project(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--baseline", str(tmp_path)], ["--backends", "onnx", "onnx-baseline"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
        error = capsys.readouterr().err
        assert "baseline" in error and "Traceback" not in error


def test_a_missing_summary_is_an_error() -> None:
    with pytest.raises(LoadError, match="no BENCH_JSON line"):
        parse_summary("Running 1s test @ http://127.0.0.1:1/\n")


def test_the_lua_script_is_shaped_per_backend() -> None:
    script = lua_script(WORKLOADS["mixed"])
    assert script.count('[==[{"text": ') == len(WORKLOADS["mixed"].texts) and '"/sentiment"' in script
    classify = Protocol("/classify", "minilm")
    script = lua_script(WORKLOADS["mixed"], classify)
    assert script.count('[==[{"input": [') == len(WORKLOADS["mixed"].texts) and '"/classify"' in script
    assert json.loads(classify.body("hi")) == {"input": ["hi"], "model": "minilm"}
    infinity_answer = {"data": [[{"score": 0.2, "label": "NEGATIVE"}, {"score": 0.8, "label": "POSITIVE"}]]}
    assert classify.label(infinity_answer) == "POSITIVE"
    assert SENTIMENT.label({"label": "NEGATIVE", "score": 0.9}) == "NEGATIVE"
    for malformed in ({"data": []}, {"error": "x"}, {"data": [[{"score": 1.0, "label": 3}]]}):
        with pytest.raises((LookupError, TypeError)):
            classify.label(malformed)


def test_cells_put_short_text_at_every_concurrency_and_long_texts_at_their_own() -> None:
    assert cells(["short", "long", "mixed"], [1, 8, 32], [8]) == [
        ("short", 1), ("short", 8), ("short", 32), ("long", 8), ("mixed", 8)]
    assert cells(["long"], [1], [1, 8]) == [("long", 1), ("long", 8)]


def test_the_sweep_covers_every_setting_and_the_services_own() -> None:
    service = inprocess.service_settings(DEFAULT_MODEL_DIR)
    grid = inprocess.settings_grid(2, service)
    bench_rows = [s for s in grid if s.session == "bench"]
    # intra 1, 2 x spinning x (1, 2 threads x batch 1, 8, and batch 8 split over 2 threads: 8 texts in flight)
    assert len(bench_rows) == len(set(bench_rows)) == 20
    assert {(s.intra_op, s.spinning, s.threads, s.batch) for s in bench_rows} == {
        (i, spin, t, b) for i in (1, 2) for spin in (True, False) for t, b in ((1, 1), (1, 8), (2, 1), (2, 8), (2, 4))}
    served = [s for s in grid if s.session == "service"]
    assert {(s.intra_op, s.spinning) for s in served} == {(service.ort_threads, service.ort_spinning)}
    assert {s.threads for s in served} == {1, service.batch_workers}
    assert {s.intra_op for s in inprocess.settings_grid(1, service) if s.session == "bench"} == {1}
    # --batches: other run sizes, on the sweep and the service's rows alike
    sizes = inprocess.settings_grid(1, service, (1, 2, 4))
    assert {(s.threads, s.batch) for s in sizes if s.session == "bench"} == {
        (t, b) for t in (1, 2) for b in (1, 2, 4)}
    assert {s.batch for s in sizes if s.session == "service"} == {1, 2, 4}


def test_the_sweep_command_refuses_a_batch_below_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        inprocess.main(["--batches", "0"])
    assert exited.value.code == 2 and "--batches" in capsys.readouterr().err


def test_the_limits_are_the_best_rows_and_latency_comes_from_one_call_alone() -> None:
    def row(session: str, intra: int, threads: int, batch: int, rate: float, p50: float) -> dict[str, Any]:
        return {"session": session, "intra_op": intra, "spinning": False, "threads": threads, "batch": batch,
                "texts_per_s": rate, "p50_ms": p50}

    rows = [row("bench", 1, 1, 1, 300, 3.0), row("bench", 1, 2, 8, 800, 20.0), row("bench", 2, 1, 1, 350, 2.5),
            row("bench", 2, 2, 1, 500, 1.0),  # two calls at once: not a one-call latency
            row("service", 2, 1, 1, 340, 2.7), row("service", 2, 1, 8, 600, 12.0)]
    found = inprocess.best(rows)
    assert found["best"]["throughput"]["texts_per_s"] == 800
    assert found["best"]["latency"]["p50_ms"] == 2.5
    assert found["service"]["throughput"]["texts_per_s"] == 600 and found["service"]["latency"]["p50_ms"] == 2.7


def test_a_short_real_sweep_returns_every_row_then_its_finalists() -> None:
    result = inprocess.sweep(DEFAULT_MODEL_DIR, seconds=0.01, rounds=1, workloads=["short"])
    short = result["workloads"]["short"]
    grid = inprocess.settings_grid(result["cores"], inprocess.service_settings(DEFAULT_MODEL_DIR))
    assert len(short["settings"]) == len(grid)
    assert all(r["calls"] >= r["threads"] and r["texts_per_s"] > 0 and r["p50_ms"] > 0 for r in short["settings"])
    rates = [r["texts_per_s"] for r in short["settings"] if r["session"] == "bench"]
    assert short["best"]["throughput"]["texts_per_s"] == max(rates)
    assert short["service"]["latency"]["session"] == "service"
    # the later repetitions: the two fastest and the two lowest-latency settings, the fastest at each
    # number of texts in flight, and the service's rows
    chosen = inprocess.finalists(result)
    fastest_by_flight = inprocess.best_in_flight([r for r in short["settings"] if r["session"] == "bench"])
    assert sorted(fastest_by_flight) == [1, 2, 8, 16]
    assert 2 <= len(chosen["short"]) <= 4 + len(fastest_by_flight)
    assert inprocess.setting_of(fastest_by_flight[8]).key() in chosen["short"]
    assert inprocess.setting_of(short["best"]["throughput"]).key() in chosen["short"]
    assert inprocess.setting_of(short["best"]["latency"]).key() in chosen["short"]
    with pytest.raises(ValueError, match="need one with 1 thread and batch 1"):
        inprocess.sweep(DEFAULT_MODEL_DIR, 0.01, 1, ["short"], only={"short": ["bench/intra1/spin0/thr2/b8"]})
    again = inprocess.sweep(DEFAULT_MODEL_DIR, seconds=0.01, rounds=1, workloads=["short"], only=chosen)
    keys = [inprocess.setting_of(r).key() for r in again["workloads"]["short"]["settings"]]
    assert keys == [s.key() for s in grid if s.key() in chosen["short"] or s.session == "service"]


def test_the_sessions_comparison_alternates_both_layouts_and_prints_their_ratio(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert sessions.main(["--workloads", "short", "--seconds", "0.05", "--rounds", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["short round 1", "short round 2", "short"]
    assert all("one shared session" in line and "one session each" in line for line in lines[:2])
    assert lines[2].startswith("short: one session each ÷ one shared, median ")


@pytest.mark.parametrize("argv", [["--seconds", "0"], ["--rounds", "0"], ["--model-dir", "/nonexistent"]])
def test_the_sessions_comparison_refuses_bad_arguments_in_one_line(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        sessions.main(argv)
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "error:" in error and "Traceback" not in error


def test_a_failed_infinity_install_is_one_line_and_the_run_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # a pin pip rejects at once: the install must fail without a traceback, then the bench goes on
    monkeypatch.setattr(infinity, "VENV", tmp_path / "venv")
    monkeypatch.setattr(infinity, "TORCH", "torch==not-a-version")
    assert infinity.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot install Infinity: `pip install torch==not-a-version` exited with")
    assert "Traceback" not in "\n".join(err)
    specs, skipped = backend_specs(["infinity", "floor"], "onnx_models/minilm-l6-sentiment", tmp_path)
    assert list(specs) == ["floor"] and skipped["infinity"].startswith("cannot install Infinity")
    assert not (tmp_path / "venv" / ".installed").exists()


@pytest.mark.slow
def test_infinity_serves_the_model_under_wrk(tmp_path: Path) -> None:
    """Install Infinity on first use (minutes), start it on a copy of the model, drive it with wrk."""
    _need_wrk()
    specs, skipped = backend_specs(["infinity"], "onnx_models/minilm-l6-sentiment", tmp_path)
    assert not skipped, skipped
    started = start(specs["infinity"]["server"], tmp_path, timeout=120)
    try:
        assert started.label == "POSITIVE"
        run = run_wrk(started.port, WORKLOADS["short"], 2, 1, started.spec.protocol)
        assert run["requests"] > 0 and run["errors"] == 0
    finally:
        stop(started)


def synthetic_result(onnx_p50_us: int = 2_200, skipped: dict[str, str] | None = None) -> dict[str, Any]:
    """Return a small result as `python -m bench` builds it: five backends, one repetition."""
    def run(backend: str, workload: str, connections: int, p50: int, rps: float, cpu_s: float = 0.5,
            p99: int | None = None) -> dict[str, Any]:
        return {"rep": 0, "backend": backend, "workload": workload, "connections": connections,
                "p50_us": p50, "p90_us": p50 * 2, "p99_us": p99 or p50 * 3 // 2, "throughput_rps": rps,
                "requests": 100, "errors": 0, "client_cpu_share": 0.05, "server_cpu_s": cpu_s,
                "foreign_cpu_share": 0.0}

    runs = [run("pytorch", "short", 1, 15_000, 65.0), run("optimum", "short", 1, 6_000, 150.0),
            run("infinity", "short", 1, 11_000, 90.0), run("floor", "short", 1, 300, 3_000.0, 0.035, 900),
            run("onnx", "short", 1, onnx_p50_us, 400.0)]
    for connections, factor in ((8, 1.0), (32, 1.2)):
        runs += [run("pytorch", "short", connections, 80_000, 50.0 * factor),
                 run("optimum", "short", connections, 40_000, 120.0 * factor),
                 run("infinity", "short", connections, 30_000, 200.0 * factor),
                 run("floor", "short", connections, 2_000, 2_800.0, 0.035),
                 run("onnx", "short", connections, 10_000, 600.0 * factor)]
    runs += [run("onnx", "long", 8, 300_000, 34.0), run("onnx", "mixed", 8, 70_000, 100.0)]
    servers = [{"rep": 0, "backend": name, "cold_start_s": cold, "rss_mb": rss, "peak_rss_mb": rss + 10,
                "pss_mb": rss - 20}
               for name, cold, rss in (("pytorch", 4.6, 480.0), ("optimum", 6.0, 480.0), ("infinity", 5.0, 520.0),
                                       ("floor", 0.3, 60.0), ("onnx", 0.6, 180.0))]

    def limits(rate: float, p50: float, service_rate: float, service_p50: float, eight: float) -> dict[str, Any]:
        best_rate = {"session": "bench", "intra_op": 1, "spinning": False, "threads": 2, "batch": 8,
                     "texts_per_s": rate, "p50_ms": p50 * 8}
        # the best with 8 texts in flight, what 8 clients can give a server at most
        in_flight8 = {"session": "bench", "intra_op": 1, "spinning": False, "threads": 2, "batch": 4,
                      "texts_per_s": eight, "p50_ms": p50 * 4}
        best_p50 = {"session": "bench", "intra_op": 2, "spinning": True, "threads": 1, "batch": 1,
                    "texts_per_s": rate / 2, "p50_ms": p50}
        service = {"session": "service", "intra_op": 2, "spinning": False, "threads": 1, "batch": 1,
                   "texts_per_s": service_rate, "p50_ms": service_p50}
        return {"settings": [best_rate, in_flight8, best_p50, service],
                "best": {"throughput": best_rate, "latency": best_p50},
                "service": {"throughput": service, "latency": service}}

    inprocess_result = {"cores": 2, "workloads": {"short": limits(700.0, 2.0, 500.0, 2.6, 630.0),
                                                  "long": limits(36.0, 40.0, 30.0, 41.0, 36.0),
                                                  "mixed": limits(120.0, 6.0, 100.0, 6.5, 114.0)}}
    summary = report.summarise(runs, servers, [{"rep": 0, "result": inprocess_result}])
    summary["libraries"] = {"rss_mb": 69.0, "import_s": 0.4}
    summary["skipped"] = skipped or {}
    labels = {"pytorch": "PyTorch service", "optimum": "Optimum pipeline", "infinity": "Infinity 0.0.78",
              "floor": "HTTP floor", "onnx": "this service (onnx)"}
    meta = {"date": "2026-01-01", "command": "python -m bench", "repetitions": 1, "duration_s": 1, "wrk": "x",
            "model": {"dir": "m", "model_sha256": "ab", "created_at": "2026-01-01"}, "commit": "c0ffee",
            "machine": {"cores": 2, "cpu": "test"}, "load": {"before": "0 0 0", "after": "0 0 0"}, "wall_s": 1.0}
    return {"meta": meta, "summary": summary, "targets": report.targets(summary), "skipped": skipped or {},
            "backends": {name: {"label": label, "size_key": None if name == "floor" else name}
                         for name, label in labels.items()},
            "workloads": {"short": ["text"], "long": ["text"], "mixed": ["text"]},
            "sizes": {"onnx": {"total_mb": 200.0, "packages": {"onnxruntime": 78.0}},
                      "pytorch": {"total_mb": 1100.0, "packages": {"torch": 755.0}}}}


def by_name(checks: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Return the targets keyed by their name."""
    return {check["target"]: check for check in checks}


def test_the_targets_are_the_issues_list() -> None:
    assert list(by_name(synthetic_result()["targets"])) == [
        "short c=1: p50 <= in-process best p50 + 0.5 ms", "short c=1: p50 < Optimum pipeline's",
        "short c=1: p50 < Infinity's", "short c=1: p99 <= 2 x p50",
        "short c=8: req/s >= 0.85 x in-process limit", "short c=8: req/s >= 2 x Infinity",
        "short c=8: req/s >= 2 x Optimum pipeline", "short c=8: req/s >= 6 x PyTorch service",
        "short c=32: req/s >= 0.85 x in-process limit", "short c=32: req/s >= 2 x Infinity",
        "short c=32: req/s >= 2 x Optimum pipeline", "short c=32: req/s >= 6 x PyTorch service",
        "long c=8: req/s >= 0.9 x in-process limit", "mixed c=8: req/s >= 0.9 x in-process limit",
        "short c=8 with JSON logs: req/s >= 0.97 x the defaults",
        "short c=8 with every request traced: req/s >= 0.85 x the defaults",
        "server PSS <= 185 MiB", "cold start <= 1 s"]


def test_targets_are_met_and_missed_from_the_medians_of_one_run() -> None:
    checks = by_name(synthetic_result(onnx_p50_us=2_200)["targets"])
    verdicts = {name: check["met"] for name, check in checks.items()}
    assert verdicts["short c=1: p50 <= in-process best p50 + 0.5 ms"] is True  # 2.2 <= 2.0 + 0.5
    assert verdicts["short c=1: p50 < Optimum pipeline's"] is True  # 2.2 < 6.0
    assert verdicts["short c=1: p99 <= 2 x p50"] is True  # 3.3 <= 4.4
    assert verdicts["short c=8: req/s >= 0.85 x in-process limit"] is True  # 600 >= 595
    assert verdicts["short c=8: req/s >= 2 x Infinity"] is True  # 600 >= 400
    assert verdicts["short c=32: req/s >= 2 x Infinity"] is True  # 720 >= 480
    assert verdicts["short c=8: req/s >= 6 x PyTorch service"] is True  # 600 >= 300
    assert verdicts["long c=8: req/s >= 0.9 x in-process limit"] is True  # 34 >= 32.4
    assert verdicts["mixed c=8: req/s >= 0.9 x in-process limit"] is False  # 100 < 108
    assert verdicts["server PSS <= 185 MiB"] is True and verdicts["cold start <= 1 s"] is True
    assert all(check["why"] == "" for check in checks.values() if check["met"])
    missed = by_name(synthetic_result(onnx_p50_us=3_000)["targets"])
    assert missed["short c=1: p50 <= in-process best p50 + 0.5 ms"]["met"] is False
    assert missed["short c=1: p50 < Optimum pipeline's"]["met"] is True


def test_a_missed_target_says_why_from_the_same_run() -> None:
    checks = by_name(synthetic_result(onnx_p50_us=3_000)["targets"])
    assert checks["short c=1: p50 <= in-process best p50 + 0.5 ms"]["why"] == (
        "the service adds 1.0 ms to the model's best in-process p50 (2.0 ms); at the service's own session "
        "setting (intra 2, spinning off, 1 thread, batch 1) the model alone takes 2.6 ms; "
        "the HTTP floor answers in 0.30 ms (p50)")
    # 0.5 s of server CPU over 100 requests; 0.9 x 120 texts/s on 2 cores leaves 18.5 ms per request.
    # At most 8 texts in flight, 114 texts/s, plus the floor's 0.35 ms: 2 / (2 / 114 + 0.00035) = 112 req/s,
    # and 2 / 108 - 2 / 114 - 0.35 ms = 0.62 ms left
    assert checks["mixed c=8: req/s >= 0.9 x in-process limit"]["why"] == (
        "with at most 8 texts in flight the model alone does 114 texts/s (0.95 x the limit); adding the HTTP "
        "floor's 0.35 ms of CPU a request, a server that cost nothing else would serve 112 req/s (0.93 x the "
        "limit), which leaves 0.62 ms of CPU a request for the rest of the server's work; 5.0 ms of server "
        "CPU per request; 0.9 x the limit needs at most 18.5 ms on "
        "2 cores, of which the HTTP floor takes 0.35 ms; at the service's own session setting (intra 2, "
        "spinning off, 1 thread, batch 1) the model alone does 100 texts/s")


def test_equal_latency_is_not_below_a_peers() -> None:
    checks = by_name(synthetic_result(onnx_p50_us=6_000)["targets"])
    assert checks["short c=1: p50 < Optimum pipeline's"]["met"] is False
    assert checks["short c=1: p50 < Infinity's"]["met"] is True


def test_a_skipped_peer_is_not_measured_and_says_why() -> None:
    result = synthetic_result(skipped={"infinity": "cannot install Infinity: `pip install x` exited with 1: no"})
    summary = result["summary"]
    for key in [k for k in summary["cells"] if k.startswith("infinity/")]:
        del summary["cells"][key]
    checks = by_name(report.targets(summary))
    check = checks["short c=8: req/s >= 2 x Infinity"]
    assert check["met"] is None and check["detail"].startswith("not measured: cannot install Infinity")
    assert checks["short c=1: p50 < Infinity's"]["met"] is None
    assert checks["short c=8: req/s >= 2 x Optimum pipeline"]["met"] is True


def test_the_cost_of_observing_is_a_ratio_to_the_defaults_of_the_same_repetitions() -> None:
    def run(backend: str, rep: int, rps: float, cpu_s: float) -> dict[str, Any]:
        return {"rep": rep, "backend": backend, "workload": "short", "connections": 8, "p50_us": 10_000,
                "p90_us": 20_000, "p99_us": 30_000, "throughput_rps": rps, "requests": 1000, "errors": 0,
                "client_cpu_share": 0.05, "server_cpu_s": cpu_s, "foreign_cpu_share": 0.0}

    # the defaults' throughput moves between repetitions; each variant is compared within its own
    runs = [run("onnx", 0, 600.0, 1.0), run("onnx", 1, 400.0, 1.0),
            run("onnx-json", 0, 588.0, 1.02), run("onnx-json", 1, 392.0, 1.02),  # 0.98 x in both
            run("onnx-traced", 0, 480.0, 1.3), run("onnx-traced", 1, 320.0, 1.3)]  # 0.80 x in both
    checks = by_name(report.targets(report.summarise(runs, [], [])))
    logs = checks["short c=8 with JSON logs: req/s >= 0.97 x the defaults"]
    traced = checks["short c=8 with every request traced: req/s >= 0.85 x the defaults"]
    assert (logs["met"], logs["measured"], logs["bound"]) == (True, 0.98, 0.97)
    assert (traced["met"], traced["measured"]) == (False, 0.8)
    assert "1.30 ms of server CPU per request against 1.00 ms at the defaults" in traced["why"]
    unmeasured = by_name(report.targets(report.summarise(runs[:2], [], [])))
    assert unmeasured["short c=8 with JSON logs: req/s >= 0.97 x the defaults"]["met"] is None


def test_a_missed_throughput_or_memory_target_names_its_cause() -> None:
    summary = synthetic_result()["summary"]
    ours8 = summary["cells"][report.cell_key("onnx", "short", 8)]
    ours8["throughput_rps"]["median"] = 100.0
    ours8["foreign_cpu_share"] = {"median": 0.5, "min": 0.5, "max": 0.5, "n": 1}
    summary["servers"]["onnx"]["pss_mb"]["median"] = 200.0
    summary["servers"]["onnx"]["cold_start_s"] = {"median": 1.2, "min": 1.1, "max": 1.3, "n": 3}
    variant = copy.deepcopy(ours8)
    variant["backend"], variant["throughput_rps"]["median"] = "onnx-w1", 150.0
    summary["cells"][report.cell_key("onnx-w1", "short", 8)] = variant
    checks = by_name(report.targets(summary, cores=2))
    # 0.5 s of server CPU over 100 requests; 0.85 x 700 texts/s on 2 cores leaves 3.4 ms per request;
    # 8 texts in flight give the model 630 texts/s, and with the floor's CPU 567 req/s: under 0.85 x 700
    assert checks["short c=8: req/s >= 0.85 x in-process limit"]["why"] == (
        "with at most 8 texts in flight the model alone does 630 texts/s (0.90 x the limit); adding the HTTP "
        "floor's 0.35 ms of CPU a request, a server that cost nothing else would serve 567 req/s (0.81 x the "
        "limit): out of reach on this stack; 5.0 ms of server CPU per request; 0.85 x the limit needs at "
        "most 3.4 ms on 2 cores, of which the HTTP floor takes 0.35 ms; at the service's own session setting "
        "(intra 2, spinning off, 1 thread, batch 1) the model alone does 500 texts/s; other jobs took up to "
        "0.5 cores during this cell; variants in this run: onnx-w1 150.0 req/s")
    assert checks["short c=8: req/s >= 2 x Infinity"]["why"].startswith(
        "5.0 ms of server CPU per request; 2 x Infinity needs at most 5.0 ms on 2 cores")
    assert "Infinity uses 5.0 ms of server CPU per request" in checks["short c=8: req/s >= 2 x Infinity"]["why"]
    assert checks["server PSS <= 185 MiB"]["why"] == (
        "Python with the serving libraries imported, before any model, takes 69 MiB (RSS, one process)")
    assert checks["cold start <= 1 s"]["why"] == "importing the serving libraries alone takes 0.40 s"


def test_a_cell_without_an_answer_has_no_latency() -> None:
    result = synthetic_result()
    runs = [{"rep": 0, "backend": "onnx", "workload": "long", "connections": 8, "p50_us": 0, "p90_us": 0,
             "p99_us": 0, "throughput_rps": 0.0, "requests": 0, "errors": 0, "client_cpu_share": 0.01,
             "server_cpu_s": 1.0, "foreign_cpu_share": 0.0}]
    cell = report.summarise(runs, [], [])["cells"]["onnx/long/c8"]
    assert cell["p50_ms"] is None and cell["throughput_rps"]["median"] == 0.0
    assert result["summary"]["cells"]["onnx/long/c8"]["p50_ms"]["median"] == 300.0


def test_report_writes_json_markdown_and_plots(tmp_path: Path) -> None:
    result = synthetic_result(skipped={"pytorch": "left out by --backends"})
    paths = report.write(result, tmp_path, "tiny")
    assert [p.name for p in paths] == ["tiny.json", "tiny.md", "tiny-latency.png", "tiny-throughput.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    text = (tmp_path / "tiny.md").read_text()
    assert "Not measured in this run: **pytorch**: left out by --backends." in text
    assert ("| short c=1: p50 <= in-process best p50 + 0.5 ms | 2.2 ms | 2.5 ms (best one-call p50 2.00 ms: "
            "intra 2, spinning on, 1 thread, batch 1) | met |  |") in text
    floor_row = "| short | 1 | HTTP floor | 0.3 | 0.6 | 0.9 | 3000 | 46.15 | 0.02 | n/a | 0 / 100 | 5 % | 0.35 |"
    assert f"{floor_row} 0 % |" in text
    assert ("| short | best of the sweep | 700 | intra 1, spinning off, 2 threads, batch 8 | 2.00 "
            "| intra 2, spinning on, 1 thread, batch 1 |") in text
    assert ("| short | the service's, at its defaults | 500 | intra 2, spinning off, 1 thread, batch 1 | 2.60 "
            "| intra 2, spinning off, 1 thread, batch 1 |") in text
    sweep_row = "| service session: intra 2, spinning off, 1 thread, batch 1 | 500 | 2.60 | 30 | 41.00 | 100 | 6.50 |"
    assert sweep_row in text
    assert json.loads((tmp_path / "tiny.json").read_text())["targets"] == result["targets"]


def test_a_peer_kept_for_the_whole_run_has_one_cold_start() -> None:
    assert restarted("onnx") and restarted("onnx-w1") and restarted("floor")
    assert not restarted("infinity") and not restarted("optimum") and not restarted("pytorch")
    servers = [{"rep": rep, "backend": "optimum", "cold_start_s": 6.0 if rep == 0 else None, "rss_mb": 480.0 + rep,
                "peak_rss_mb": 490.0} for rep in range(3)]
    summary = report.summarise([], servers, [])["servers"]["optimum"]
    assert summary["cold_start_s"] == {"median": 6.0, "min": 6.0, "max": 6.0, "n": 1}
    assert summary["rss_mb"]["n"] == 3


def test_profile_buckets_a_stack_by_its_innermost_known_frame() -> None:
    from bench.profile import bucket

    pool = "Thread._bootstrap (threading.py:1002);ThreadedTaskDispatcher.handler_thread (waitress/task.py:{})"
    request = pool.format(83) + (";HTTPChannel.service (waitress/channel.py:430);Flask.dispatch_request "
                                 "(flask/app.py:902);sentiment (service/api.py:36)")
    assert bucket(pool.format(71) + ";Condition.wait (threading.py:327)") is None  # waiting for a task
    assert bucket("main (service/__main__.py:67);EpollSelector.select (selectors.py:468)") is None
    assert bucket(request + ";Classifier.run (service/classifier.py:371);Session.run "
                  "(onnxruntime/capi/onnxruntime_inference_collection.py:406)") == "model: session.run"
    assert bucket(request + ";Scheduler._await (service/batching.py:222);Event.wait (threading.py:629)") == \
        "wait: queue / batch hand-off"
    assert bucket(request + ";read_body (service/schemas.py:49)") == "request JSON parse + validation"
    assert bucket(pool.format(83) + ";HTTPChannel.service (waitress/channel.py:430)") == \
        "Waitress (HTTP parse, write, threads)"


def test_profile_leaves_idle_loops_and_idle_background_threads_out() -> None:
    from bench.profile import bucket

    assert bucket("loop (waitress/wasyncore.py:244);poll2 (waitress/wasyncore.py:213)") is None
    background = "Thread.run (threading.py:982);_loop (service/batching.py:90);Condition.wait (threading.py:327)"
    assert bucket(background) is None
    inside = "HTTPChannel.service (waitress/channel.py:430);_await (service/batching.py:22);Event.wait (threading.py:1)"
    assert bucket(inside) == "wait: queue / batch hand-off"
