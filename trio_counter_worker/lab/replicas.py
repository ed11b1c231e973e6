"""Replica processes and the lease, as an operator sees them.

- :func:`spawn_replica` / :class:`Replica` / :func:`stop_replicas`: replicas run as
  ``python -m trio_counter_worker run`` children with JSON logs to a file, read back as
  events while they grow;
- :func:`read_lease`: who holds the lease, read the way an operator would.

Plain subprocesses, no trio: tools around the worker, not the worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import site
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from ..config import SETTINGS

__all__ = [
    "LeaseInfo",
    "Replica",
    "log_tails",
    "new_exits",
    "read_lease",
    "replica_env",
    "spawn_replica",
    "stop_replicas",
    "tail",
]

STOP_TIMEOUT = 5.0  # SIGTERM -> SIGKILL


# -- processes --------------------------------------------------------------------------


def tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a file, indented; empty if it cannot be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "".join(f"    {line}\n" for line in text.splitlines()[-lines:])


# -- replicas ---------------------------------------------------------------------------


class Replica:
    """One ``python -m trio_counter_worker run`` child; its JSON log is read as it grows."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path
        self.signalled: str | None = None  # the fault we sent it, if any
        self.reported_exit = False
        self.other_lines: list[str] = []  # lines that are not JSON records (tracebacks)
        self._offset = 0
        self._partial = b""

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def new_events(self) -> list[dict[str, Any]]:
        """JSON log records written since the last call (other lines are kept aside in
        ``other_lines``)."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return []
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        records = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                records.append(record)
            elif line.strip():
                self.other_lines.append(line.decode(errors="replace"))
        return records


def new_exits(replicas: Iterable[Replica]) -> list[tuple[Replica, int]]:
    """The replicas that exited since the last call, with their exit codes."""
    exited = []
    for replica in replicas:
        code = replica.proc.poll()
        if code is not None and not replica.reported_exit:
            replica.reported_exit = True
            exited.append((replica, code))
    return exited


def log_tails(replicas: Iterable[Replica]) -> str:
    """The end of each replica's log, for an error message."""
    return "".join(f"\n  {r.name} (exit {r.proc.poll()}):\n{tail(r.log_path)}" for r in replicas)


def _package_root() -> Path:
    return Path(__file__).resolve().parents[2]


def replica_env(base: Mapping[str, str], settings: Mapping[str, str]) -> dict[str, str]:
    """``base`` without any of the worker's settings (and a stray REDIS_URL would win
    over REDIS_PORT), plus ``settings``; the package importable from any cwd."""
    names = {s.name for s in SETTINGS}
    env = {k: v for k, v in base.items() if k not in names}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(settings)
    root = str(_package_root())
    installed = {*site.getsitepackages(), site.getusersitepackages()}
    if root not in installed:  # running from a source tree: children import the same code
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def spawn_replica(directory: Path, name: str, settings: Mapping[str, str]) -> Replica:
    """Start ``python -m trio_counter_worker run`` as ``name``, configured by
    ``settings`` only (plus LOG_FORMAT=json and REPLICA_ID=name unless given), from an
    empty working directory (no stray .env), logging to ``directory/<name>.log``."""
    cwd = directory / name
    cwd.mkdir()
    log_path = directory / f"{name}.log"
    env = replica_env(os.environ, {"REPLICA_ID": name, "LOG_FORMAT": "json", **settings})
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trio_counter_worker", "run"],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    return Replica(name, proc, log_path)


def stop_replicas(replicas: Iterable[Replica], timeout: float = STOP_TIMEOUT) -> None:
    """SIGCONT (one may be frozen) and SIGTERM them all, wait up to ``timeout`` in
    total, SIGKILL the rest; reap every one."""
    replicas = list(replicas)
    for replica in replicas:
        if replica.alive:
            with contextlib.suppress(ProcessLookupError):
                replica.proc.send_signal(signal.SIGCONT)
                replica.proc.terminate()
    deadline = time.monotonic() + timeout
    for replica in replicas:
        try:
            replica.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            replica.proc.kill()
            replica.proc.wait()


# -- the lease --------------------------------------------------------------------------


@attrs.frozen
class LeaseInfo:
    """Who leads: the lease hash as an operator would read it."""

    replica: str
    epoch: int  # the fencing token
    holder: str = ""  # unique per process
    since_ms: int | None = None  # when this lease was taken, Redis's clock

    def taken_after(self, start: float, now: float, offset: float = 0.0) -> float:
        """How long after ``start`` (this host's wall clock) the lease was taken, from
        ``since_ms`` (``offset``: Redis's clock minus ours); ``now - start`` when it
        does not say, or names a time before ``start`` (an older lease)."""
        if self.since_ms is not None:
            taken = self.since_ms / 1000 - offset
            if taken >= start - 0.005:
                return max(0.0, taken - start)
        return max(0.0, now - start)


def read_lease(client: Any, key: str) -> LeaseInfo | None:
    """The lease in ``key`` through a redis-py client (``decode_responses=True``), or
    None when nobody holds it."""
    raw = {str(k): str(v) for k, v in dict(client.hgetall(key) or {}).items()}
    replica, epoch = raw.get("replica"), raw.get("epoch", "")
    if not replica or not epoch.isdigit():
        return None
    since = raw.get("since_ms", "")
    return LeaseInfo(
        replica, int(epoch), raw.get("holder", ""), int(since) if since.isdigit() else None
    )
