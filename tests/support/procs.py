"""Run ``python -m trio_counter_worker`` as real child processes, with a controlled environment."""

from __future__ import annotations

import os
import signal as signal_mod
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import trio

if TYPE_CHECKING:
    from tests.support.backend import RecordingBackend
    from tests.support.redis_server import RedisServer

MODULE = "trio_counter_worker"
# The app's configuration namespaces: never inherited from the developer's shell.
ENV_PREFIXES = ("REDIS_", "RESET_", "COUNTER_", "LEASE_", "REPLICA_", "LOG_", "MAX_IN_FLIGHT")
# Children run from an empty tmp cwd, so make the package importable even if not installed.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_WAIT = 10.0
_POLL_INTERVAL = 0.05


def clean_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``os.environ`` without the app's config variables, with ``env`` laid on top.

    Also sets PYTHONUNBUFFERED=1 (logs reach the file as they happen) and puts the
    project root first on PYTHONPATH.
    """
    merged = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIXES)}
    merged["PYTHONUNBUFFERED"] = "1"
    merged.update(env or {})
    pythonpath = [str(PROJECT_ROOT)]
    if merged.get("PYTHONPATH"):
        pythonpath.append(merged["PYTHONPATH"])
    merged["PYTHONPATH"] = os.pathsep.join(pythonpath)
    return merged


def worker_env(
    redis_server: RedisServer, backend: RecordingBackend, **settings: str
) -> dict[str, str]:
    """A worker's settings: ``redis_server``, ``backend``, counters ``c:*``, and
    ``settings`` (by variable name) added or overriding."""
    return {
        "REDIS_HOST": redis_server.host,
        "REDIS_PORT": str(redis_server.port),
        "RESET_ENDPOINT_URL": backend.url,
        "RESET_SECRET": "s",
        "COUNTER_KEY": "c:*",
        **settings,
    }


def run_cli(
    args: Sequence[str],
    env: Mapping[str, str],
    timeout: float = 30.0,
    cwd: Path | None = None,
    module: str = MODULE,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m trio_counter_worker *args`` to completion, capturing text output.

    ``cwd`` defaults to a fresh empty temporary directory so no stray ``.env`` is read.
    ``module`` exists so the support code itself can be tested with a stand-in.
    Raises subprocess.TimeoutExpired (after killing the child) if it runs too long.
    """
    cmd = [sys.executable, "-m", module, *args]
    if cwd is not None:
        return _run(cmd, env, timeout, cwd)
    with tempfile.TemporaryDirectory(prefix="cli-cwd-") as tmp:
        return _run(cmd, env, timeout, Path(tmp))


def _run(
    cmd: list[str], env: Mapping[str, str], timeout: float, cwd: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        env=clean_env(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class SpawnWorker(Protocol):
    """Type of the ``spawn_worker`` fixture (annotate test parameters with it)."""

    def __call__(
        self, env: Mapping[str, str], name: str, args: Sequence[str] = ("run",)
    ) -> WorkerProcess: ...


class WorkerProcess:
    """One ``python -m trio_counter_worker`` replica, stdout+stderr going to ``log_path``."""

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: Path,
        args: Sequence[str] = ("run",),
        cwd: Path | None = None,
        module: str = MODULE,
    ) -> None:
        self.env = dict(env)
        self.module = module
        self.log_path = Path(log_path)
        self.args = tuple(args)
        # Default: an empty dir next to the log, so no stray .env is picked up.
        self.cwd = cwd if cwd is not None else self.log_path.with_name(f"{self.log_path.stem}-cwd")
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Spawn the process (does not wait for it to be ready: see wait_for_output)."""
        if self._proc is not None:
            raise RuntimeError(f"{self!r} already started")
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            # The child keeps its own copy of the fd; ours closes with the block.
            self._proc = subprocess.Popen(
                [sys.executable, "-m", self.module, *self.args],
                env=clean_env(self.env),
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def _started(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError("worker not started")
        return self._proc

    @property
    def pid(self) -> int:
        """The child's PID."""
        return self._started.pid

    @property
    def alive(self) -> bool:
        """Whether the process has not exited yet (a SIGSTOPped process is alive)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit status (negative signal number if killed by one), None while running."""
        return self._started.poll()

    def signal(self, sig: int) -> None:
        """Send ``sig`` (e.g. signal.SIGSTOP / SIGCONT / SIGINT); no-op once exited."""
        self._started.send_signal(sig)

    def terminate(self) -> None:
        """Send SIGTERM without waiting (a SIGSTOPped process only sees it after SIGCONT)."""
        self._started.terminate()

    def kill(self) -> int:
        """SIGKILL (works on stopped processes too), reap, and return the exit status."""
        proc = self._started
        proc.kill()
        return proc.wait()

    def wait(self, timeout: float = DEFAULT_WAIT) -> int:
        """Wait for exit and return the status; AssertionError with the log if it doesn't exit."""
        try:
            return self._started.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self!r} still running after {timeout}s\n{self._tail()}"
            ) from None

    def output(self) -> str:
        """Everything the process wrote so far (stdout and stderr interleaved)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _check_output(self, substring: str, timeout: float, deadline: float) -> str | None:
        # Sample liveness before reading, so output written just before exit is seen.
        exited = not self.alive
        text = self.output()
        if substring in text:
            return text
        if exited:
            raise AssertionError(
                f"{self!r} exited (status {self.returncode}) without printing "
                f"{substring!r}\n{self._tail(text)}"
            )
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"{self!r} did not print {substring!r} within {timeout}s\n{self._tail(text)}"
            )
        return None

    def wait_for_output(self, substring: str, timeout: float = DEFAULT_WAIT) -> str:
        """Poll the log until it contains ``substring``; return the whole log.

        Fails fast (AssertionError) if the process exits first.
        """
        deadline = time.monotonic() + timeout
        while (text := self._check_output(substring, timeout, deadline)) is None:
            time.sleep(_POLL_INTERVAL)
        return text

    async def wait_for_output_async(self, substring: str, timeout: float = DEFAULT_WAIT) -> str:
        """:meth:`wait_for_output` without blocking the trio event loop."""
        deadline = time.monotonic() + timeout
        while (text := self._check_output(substring, timeout, deadline)) is None:
            await trio.sleep(_POLL_INTERVAL)
        return text

    def cleanup(self) -> None:
        """Make sure the process is gone: SIGCONT (in case it was stopped), SIGKILL, reap."""
        if self.alive:
            self.signal(signal_mod.SIGCONT)
            self.kill()
        elif self._proc is not None:
            self._proc.wait()

    def _tail(self, text: str | None = None, chars: int = 4000) -> str:
        text = self.output() if text is None else text
        return f"--- {self.log_path.name} (last {chars} chars) ---\n{text[-chars:]}"

    def __repr__(self) -> str:
        pid = self._proc.pid if self._proc is not None else None
        return f"<WorkerProcess {' '.join(self.args)} pid={pid} log={self.log_path.name}>"
