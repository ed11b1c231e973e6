"""``trio-counter-worker chaos``: the verification tool, run end to end as a subprocess.

The run starts its own redis-server (append-only), backend and replicas, injects every
fault kind, and must report no missed or doubled episode on its last stdout line.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from trio_counter_worker import chaos
from trio_counter_worker.lab import ResetPost

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--replicas", "3", "--duration", "20", "--fault-every", "2", "--json", "--seed", "1"]
TIMEOUT = 60.0  # ~25 s expected: startup, 20 s of faults, the last expiries, cleanup


def _run_chaos(tmp: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run the command with its temp files under ``tmp``; on timeout, kill its group."""
    env = dict(os.environ)
    env["TMPDIR"] = str(tmp)
    env["PYTHONIOENCODING"] = "utf-8"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        [sys.executable, "-m", "trio_counter_worker.chaos", *args],
        cwd=tmp,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        start_new_session=True,  # its own process group: replicas and redis-server too
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.terminate()  # it cleans up on SIGTERM ...
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # ... or everything goes
            out, err = proc.communicate()
        pytest.fail(f"chaos still running after {TIMEOUT:g} s:\n{out}\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
def test_chaos_injects_every_fault_without_missed_or_doubled_resets(tmp_path: Path) -> None:
    result = _run_chaos(tmp_path, ARGS)
    shown = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, shown  # --json: one object, nothing else on stdout
    report = json.loads(lines[-1])
    assert result.returncode == 0, shown
    assert report["ok"] is True, shown
    assert report["episodes"] > 0, shown
    assert report["missed"] == 0, shown
    assert report["doubled"] == 0, shown
    assert report["unexplained"] == 0, shown
    assert report["delivered"] == report["episodes"], shown
    assert report["unexpected_exits"] == [], shown
    assert report["latency_ms"]["n"] == report["episodes"], shown

    injected = {f["kind"] for f in report["fault_log"]}
    assert injected == set(chaos.FAULT_KINDS), shown  # ~9 faults: a whole shuffled round
    for kind in injected:
        stats = report["faults"][kind]
        assert stats["count"] == sum(f["kind"] == kind for f in report["fault_log"]), shown
        if kind in ("http5xx", "httphang"):
            assert "failover_ms" not in stats, shown  # no failover: latency is reported
            assert "latency_ms" in stats, shown
        else:
            assert stats["timeouts"] == 0, shown
            assert stats["failover_ms"]["n"] == stats["count"], shown
            assert stats["failover_ms"]["max"] < 5000, shown
    redis = report["faults"]["redis"]
    assert redis["resync_ms"] is not None, shown  # the leader reconnected and reconciled
    # Everything it started is gone: its temp dir (logs, Redis files) was removed.
    assert list(tmp_path.iterdir()) == [], shown


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ttl-ms", "1000:3000"], "must be at least the lease"),
        (["--ttl-ms", "3000:1000"], "0 < MIN <= MAX"),
        (["--faults", "kill,nope"], "unknown nope"),
        (["--replicas", "0"], "--replicas must be at least 1"),
        (["--lease-ms", "100"], "--lease-ms must be between 500 and 5000"),
    ],
)
def test_chaos_rejects_bad_arguments(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert chaos.chaos_main(args, out=io.StringIO(), err=io.StringIO()) == 2
    assert message in capsys.readouterr().err


def test_chaos_matches_resets_to_episodes_by_key_and_deadline() -> None:
    episodes = [
        chaos.Episode(1, "k", 10_000, 10.0, 8.0),
        chaos.Episode(2, "k", 20_000, 20.0, 17.0, earlier=(19_000,)),  # re-armed once
    ]

    def post(expired_at: float, reset_id: str, status: int = 200) -> ResetPost:
        return ResetPost("k", reset_id, expired_at, 1, "r", expired_at + 0.01, False, status)

    matching = chaos.match_posts(
        episodes,
        [post(10.0, "a", 503), post(10.002, "a"), post(20.0, "b"), post(19.0, "s"),
         post(15.0, "c")],
    )
    assert [p.reset_id for p in matching.exact[1]] == ["a", "a"]
    assert [p.reset_id for p in matching.exact[2]] == ["b"]
    assert [p.reset_id for p in matching.earlier[2]] == ["s"]
    assert [p.reset_id for p in matching.unexplained] == ["c"]


def test_chaos_percentiles_are_nearest_rank_in_ms() -> None:
    assert chaos.percentiles([]) is None
    assert chaos.percentiles([0.001 * i for i in range(1, 101)]) == {
        "n": 100, "p50": 50.0, "p99": 99.0, "max": 100.0
    }
