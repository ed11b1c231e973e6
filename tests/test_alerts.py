"""The shipped Prometheus alert rules and Grafana dashboard, tested with the real tools.

`promtool` checks the rules and runs tests/prometheus/alerts_test.yml (series that make
each alert fire, and series that keep it quiet); every expression of the dashboard is
checked by promtool too; every metric they name is one the worker serves. One end-to-end
test runs a real Prometheus scraping three real worker processes: the no-leader alert
fires when they all stop and clears when one comes back. Tests that need promtool or
prometheus skip, saying so, where Debian's `prometheus` package is not installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
import yaml

from tests.support.backend import RecordingBackend
from tests.support.procs import SpawnWorker, WorkerProcess, worker_env
from tests.support.redis_server import RedisServer, free_port
from trio_counter_worker.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus-alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
RULE_TESTS = ROOT / "tests" / "prometheus" / "alerts_test.yml"
MISSING = "not on PATH: install Debian's `prometheus` package (apt-get install prometheus)"
METRIC = re.compile(r"\btcw_[a-z_]+")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} {MISSING}")
    return path


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args], capture_output=True, text=True, cwd=cwd, timeout=60
    )


def rules() -> list[dict[str, Any]]:
    (group,) = yaml.safe_load(RULES.read_text())["groups"]
    found: list[dict[str, Any]] = group["rules"]
    return found


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in board["panels"] for target in panel["targets"]]


def served_metric_names() -> set[str]:
    """Every sample name a worker's /metrics has (with _total, _bucket... suffixes)."""
    text = Metrics().render().decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}


def test_every_rule_says_what_it_is_and_what_to_do() -> None:
    for rule in rules():
        notes = rule["annotations"]
        assert notes["summary"].strip(), rule["alert"]
        assert len(notes["runbook"].split()) >= 10, rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]


def test_rules_and_dashboard_name_only_metrics_the_worker_serves() -> None:
    served = served_metric_names()
    named = {m for rule in rules() for m in METRIC.findall(rule["expr"])}
    named |= {m for expr in dashboard_exprs() for m in METRIC.findall(expr)}
    assert named - served == set()
    # and the ones the alerts were made for are there
    assert {"tcw_leader", "tcw_redis_refused_total", "tcw_eviction_policy_unsafe"} <= named


def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_checks_every_dashboard_expression(tmp_path: Path) -> None:
    """Each panel's query as a recording rule: promtool parses it as Prometheus would."""
    recorded = [
        {"record": f"dashboard:panel_{i}", "expr": e} for i, e in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recorded}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_each_alert_fires_and_stays_quiet_in_promtool(tmp_path: Path) -> None:
    doc = yaml.safe_load(RULES.read_text())
    for rule in doc["groups"][0]["rules"]:
        rule.pop("annotations")  # their wording is checked above, not here
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(doc))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    cases = [
        case
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
    ]
    for rule in rules():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"{rule['alert']} never fires"
        assert any(not case["exp_alerts"] for case in mine), f"{rule['alert']} never quiet"
    result = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# --- end to end: a real Prometheus, three real replicas ----------------------------------

SCRAPE = "1s"
FOR = "2s"  # TcwNoLeader's `for`, shortened; its expression is the shipped one


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[list[int]], str]]:
    """``start(ports)``: a Prometheus scraping 127.0.0.1:<port> for each of ``ports`` with
    the shipped rules; returns its base URL. Stopped after the test."""
    binary = tool("prometheus")
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[IO[bytes]] = []

    def start(ports: list[int]) -> str:
        doc = yaml.safe_load(RULES.read_text())
        (no_leader,) = [r for r in doc["groups"][0]["rules"] if r["alert"] == "TcwNoLeader"]
        no_leader["for"] = FOR
        (tmp_path / "alerts.yml").write_text(yaml.safe_dump(doc))
        config = {
            "global": {"scrape_interval": SCRAPE, "evaluation_interval": SCRAPE},
            "rule_files": [str(tmp_path / "alerts.yml")],
            "scrape_configs": [
                {
                    "job_name": "trio-counter-worker",
                    "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in ports]}],
                }
            ],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        log = (tmp_path / "prometheus.log").open("wb")
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [
                    binary,
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        return f"http://127.0.0.1:{port}"

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for log in logs:
        log.close()


def poll(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def firing(base: str, alert: str) -> bool:
    try:
        answer = httpx.get(f"{base}/api/v1/alerts", timeout=5).raise_for_status().json()
    except httpx.HTTPError:  # not up yet (refused, or 503 while it starts)
        return False
    return any(
        a["labels"]["alertname"] == alert and a["state"] == "firing"
        for a in answer["data"]["alerts"]
    )


def leaders(base: str) -> float | None:
    try:
        answer = httpx.get(f"{base}/api/v1/query", params={"query": "sum(tcw_leader)"}, timeout=5)
        result = answer.raise_for_status().json()["data"]["result"]
    except httpx.HTTPError:
        return None
    return float(result[0]["value"][1]) if result else None


def test_no_leader_alert_fires_when_replicas_stop_and_clears_when_one_returns(
    redis_server: RedisServer,
    backend: RecordingBackend,
    spawn_worker: SpawnWorker,
    prometheus: Callable[[list[int]], str],
) -> None:
    tool("prometheus")
    ports = [free_port() for _ in range(3)]

    def replica(n: int) -> WorkerProcess:
        env = worker_env(
            redis_server,
            backend,
            RESET_SECRET="alert-test-secret",
            LEASE_TTL_MS="500",
            REPLICA_ID=f"r{n}",
            HEALTH_PORT=str(ports[n]),
            HEALTH_HOST="127.0.0.1",
        )
        return spawn_worker(env, f"r{n}")

    workers = [replica(n) for n in range(3)]
    base = prometheus(ports)
    poll(lambda: leaders(base) == 1.0, 60, "Prometheus to see exactly one leader")
    # Before its first scrapes Prometheus sees no leader either: wait that out.
    poll(lambda: not firing(base, "TcwNoLeader"), 30, "TcwNoLeader quiet with a leader")

    for worker in workers:
        worker.terminate()
    for worker in workers:
        assert worker.wait() == 0
    poll(lambda: firing(base, "TcwNoLeader"), 60, "TcwNoLeader to fire")

    replica(1)
    poll(lambda: not firing(base, "TcwNoLeader"), 60, "TcwNoLeader to clear")
    assert leaders(base) == 1.0
