"""``trio-counter-worker chaos``: the verification tool, run end to end as a subprocess.

The run starts its own redis-server (append-only), backend and replicas, injects faults,
and must report no missed or doubled episode on its last stdout line. One long run
takes the process and HTTP faults together; each Redis-side and poison fault has a
short run of its own (lease 1000 ms, a few seconds of activity) that also checks, from
the report, that the fault really happened.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from trio_counter_worker.lab import chaos
from trio_counter_worker.lab.backend import ResetPost

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROCESS_AND_HTTP = ("kill", "term", "stop", "redis", "http5xx", "httphang")
ARGS = [
    "--replicas",
    "3",
    "--duration",
    "20",
    "--fault-every",
    "2",
    "--json",
    "--seed",
    "1",
    "--faults",
    ",".join(PROCESS_AND_HTTP),
]
# The short runs: ~10 s each (start, a few seconds of faults, the last expiries).
SHORT = [
    "--replicas",
    "3",
    "--duration",
    "4",
    "--ttl-ms",
    "1250:2000",
    "--lease-ms",
    "1000",
    "--json",
    "--seed",
    "7",
]
TIMEOUT = 60.0  # ~25 s expected: startup, 20 s of faults, the last expiries, cleanup


def _run_chaos(tmp: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run the command with its temp files under ``tmp``; on timeout, kill its group."""
    env = dict(os.environ)
    env["TMPDIR"] = str(tmp)
    env["PYTHONIOENCODING"] = "utf-8"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        [sys.executable, "-m", "trio_counter_worker.lab.chaos", *args],
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
    assert injected == set(PROCESS_AND_HTTP), shown  # ~9 faults: a whole shuffled round
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


def _short_run(tmp: Path, kind: str, *extra: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Run ``kind`` alone; check the invariants every run must keep. The report, its
    entry for ``kind``, and everything printed (for assertion messages)."""
    result = _run_chaos(tmp, [*SHORT, "--faults", kind, *extra])
    shown = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 0, shown
    assert report["ok"] is True, shown
    assert report["episodes"] > 0, shown
    assert report["missed"] == 0, shown
    assert report["doubled"] == 0, shown
    assert report["unexplained"] == 0, shown
    assert report["delivered"] == report["episodes"], shown
    entry = report["faults"][kind]
    assert entry["count"] >= 1, shown
    assert entry["count"] == sum(f["kind"] == kind for f in report["fault_log"]), shown
    assert list(tmp.iterdir()) == [], shown
    return report, entry, shown


@pytest.mark.slow
def test_chaos_poison_refuses_some_keys_then_every_reset_lands(tmp_path: Path) -> None:
    # Two overlapping 2 s poisons of 10 keys each: some of them expire meanwhile, and
    # some of the other 10 too (a key expires every ~5 s).
    _, poison, shown = _short_run(
        tmp_path, "poison", "--fault-every", "1.5", "--poison-keys", "50%", "--poison-seconds", "2"
    )
    assert poison["refused_keys"] == 10 * poison["count"], shown
    assert poison["refused_answers"] >= 1, shown  # the backend did answer 404s ...
    assert poison["status"] == 404, shown
    assert poison["refused_episodes"] >= 1, shown
    assert poison["refused_latency_ms"]["n"] == poison["refused_episodes"], shown
    # ... for a while: each refused episode waited at least its first retry (1-2 s later)
    assert poison["refused_latency_ms"]["p50"] >= 900, shown
    # while the other keys' resets went through as usual
    assert poison["latency_ms"]["p99"] < 900, shown


@pytest.mark.slow
def test_chaos_flags_are_rewritten_restored_and_rescanned(tmp_path: Path) -> None:
    _, flags, shown = _short_run(tmp_path, "flags", "--duration", "5", "--fault-every", "1.5")
    assert flags["timeouts"] == 0, shown
    assert flags["restored"] == flags["count"], shown  # the leader put every rewrite back
    assert flags["rescan_ms"]["n"] == flags["count"], shown
    assert flags["rewritten_to"][:2] == ["", "Ex"][: flags["count"]], shown
    assert flags["restore_ms"]["max"] < 2000, shown  # checked every second
    assert flags["sets_while_off"] >= 1, shown  # counters set blind: found by the rescan


@pytest.mark.slow
def test_chaos_slow_redis_adds_the_round_trip(tmp_path: Path) -> None:
    report, slow, shown = _short_run(
        tmp_path, "slow", "--fault-every", "1", "--slow-for", "2", "--slow-ms", "50"
    )
    assert report["settings"]["proxied"] is True, shown
    assert slow["whole_run"] is False, shown
    assert slow["probe_ms"]["n"] == slow["count"], shown
    assert slow["probe_ms"]["p50"] >= 50, shown  # a delayed byte cannot arrive early
    assert slow["direct_ms"]["max"] < slow["probe_ms"]["p50"], shown
    assert slow["affected_episodes"] >= 1, shown


@pytest.mark.slow
def test_chaos_partition_makes_a_standby_take_over(tmp_path: Path) -> None:
    report, cut, shown = _short_run(
        tmp_path, "partition", "--fault-every", "1", "--partition-seconds", "2"
    )
    assert cut["timeouts"] == 0, shown
    assert cut["failover_ms"]["n"] == cut["count"], shown  # a new lease every time ...
    assert cut["standby_took_over"] == cut["count"], shown  # ... taken by another replica
    assert cut["stepped_down"] == cut["count"], shown  # the cut-off leader let go
    assert cut["failover_ms"]["max"] < 2000, shown  # within the partition: not after it
    assert report["unexpected_exits"] == [], shown


@pytest.mark.slow
def test_chaos_sentinel_failover_moves_app_and_workers_to_the_new_master(tmp_path: Path) -> None:
    # ~15 s: the Sentinel setup starts in ~5 s, one failover (a second one before the old
    # master rejoined as a replica is skipped), the last expiries.
    report, failover, shown = _short_run(
        tmp_path, "failover", "--topology", "sentinel", "--duration", "5", "--fault-every", "2"
    )
    assert failover["timeouts"] == 0, shown
    assert failover["failover_ms"]["n"] == failover["count"], shown  # a leader back each time
    assert failover["switch_ms"]["n"] == failover["count"], shown  # the app followed
    assert failover["left_old_master_ms"]["n"] == failover["count"], shown  # so did the workers
    assert report["unexpected_exits"] == [], shown


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ttl-ms", "1000:3000"], "must be at least the lease"),
        (["--ttl-ms", "3000:1000"], "0 < MIN <= MAX"),
        (["--faults", "kill,nope"], "unknown nope"),
        (["--replicas", "0"], "--replicas must be at least 1"),
        (["--lease-ms", "100"], "--lease-ms must be between 500 and 5000"),
        (["--poison-keys", "0"], "--poison-keys must be a count"),
        (["--poison-keys", "150%"], "--poison-keys must be a count"),
        (["--poison-status", "503"], "--poison-status must be a 4xx"),
        (["--slow-ms", "600"], "--slow-ms must be between 1 and half the lease"),
        (["--slow-for", "soon"], "--slow-for must be a number of seconds or run"),
        (["--partition-seconds", "0.5"], "--partition-seconds must be at least the lease"),
        (
            ["--faults", "partition", "--partition-target", "all"],
            "a partition that cuts off every replica",
        ),
        (["--faults", "failover"], "--faults failover needs --topology sentinel"),
        (
            ["--topology", "sentinel", "--redis-url", "redis://127.0.0.1:1/0"],
            "leave out --redis-url",
        ),
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
        [
            post(10.0, "a", 503),
            post(10.002, "a"),
            post(20.0, "b"),
            post(19.0, "s"),
            post(15.0, "c"),
        ],
    )
    assert [p.reset_id for p in matching.exact[1]] == ["a", "a"]
    assert [p.reset_id for p in matching.exact[2]] == ["b"]
    assert [p.reset_id for p in matching.earlier[2]] == ["s"]
    assert [p.reset_id for p in matching.unexplained] == ["c"]


def test_chaos_percentiles_are_nearest_rank_in_ms() -> None:
    assert chaos.percentiles([]) is None
    assert chaos.percentiles([0.001 * i for i in range(1, 101)]) == {
        "n": 100,
        "p50": 50.0,
        "p99": 99.0,
        "max": 100.0,
    }
