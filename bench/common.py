"""Shared helpers for the benchmarks: processes, Redis, statistics, results.

Every benchmark runs on loopback only: its own ``redis-server`` (``RedisServer``), its own
HTTP backend (``RecordingBackend``) and real ``python -m trio_counter_worker run``
processes (``WorkerProcess``): the first two from :mod:`trio_counter_worker.lab`, the
last from ``tests.support``. Import this module as
``bench.common`` with the repository root as the working directory.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import attrs
import redis

from tests.support import WorkerProcess, clean_env
from trio_counter_worker.keys import Keys
from trio_counter_worker.lab import backend as backend_module
from trio_counter_worker.lab.backend import RecordingBackend
from trio_counter_worker.lab.servers import RedisServer
from trio_counter_worker.lab.servers import redis_server_binary as find_redis_server

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
# bench/compare.py runs a benchmark for another commit by setting these two: the
# checkout whose ``trio_counter_worker`` package every worker runs (default: this working
# tree), and where the results JSON goes (default: bench/results, which it leaves alone).
CODE_ENV = "TCW_BENCH_CODE"
RESULTS_ENV = "TCW_BENCH_RESULTS"
RESULTS_DIR = Path(os.environ.get(RESULTS_ENV) or ROOT / "bench" / "results")
SECRET = "bench-" + secrets.token_hex(8)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PIPELINE_CHUNK = 10_000


# --- small utilities -------------------------------------------------------------------


def log(msg: str) -> None:
    """Progress line on stderr, with the time since the benchmark started."""
    sys.stderr.write(f"[{time.monotonic() - _T0:7.1f}s] {msg}\n")
    sys.stderr.flush()


_T0 = time.monotonic()


# An app's activity, as slowlink and touch drive it: most SETs re-armed in time, a few
# left to expire before the key's next SET (one episode each).
SHORT_TTL_MS = (500, 4000)
LONG_TTL_MS = (10_500, 13_000)  # longer than a key's re-arm period (keys / rate = 10 s)
SHORT_SHARE = 0.05


def draw_ttl_ms(rng: random.Random) -> int:
    """One SET's TTL: short (the key will expire) with SHORT_SHARE, else long."""
    short = rng.random() < SHORT_SHARE
    return rng.randint(*(SHORT_TTL_MS if short else LONG_TTL_MS))


def paced(
    rate: float, duration: float, start_at: float, poll: float = 0.001
) -> Iterator[tuple[float, range, float]]:
    """A steady ``rate`` of items per second for ``duration`` s from ``start_at`` (wall
    clock), in ticks: yields (now, the items due since the last tick, how far behind its
    schedule the first of them is, in seconds)."""
    total = int(rate * duration)
    time.sleep(max(0.0, start_at - time.time()))
    j = 0
    while j < total:
        now = time.time()
        due = min(total, int((now - start_at) * rate) + 1)
        if due <= j:
            time.sleep(poll)
            continue
        yield now, range(j, due), now - (start_at + j / rate)
        j = due


class PacedDriver(threading.Thread):
    """A driver thread doing ``rate`` things a second for ``duration`` s from ``start``
    (wall clock), in :func:`paced` ticks: it keeps how far it fell behind its schedule,
    and an error for the run to report instead of losing it in the thread. Subclasses
    define :meth:`drive`, looping over :meth:`ticks`."""

    def __init__(self, name: str, *, rate: float, start: float, duration: float, seed: int):
        super().__init__(name=name, daemon=True)
        self._rate = rate
        self.start_at = start
        self._duration = duration
        self._rng = random.Random(seed)
        self.behind_max_s = 0.0  # how far it fell behind its schedule, at most
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.drive()
        except BaseException as exc:  # reported by the run, not lost in the thread
            self.error = exc

    def drive(self) -> None:
        raise NotImplementedError

    def ticks(self, poll: float = 0.001) -> Iterator[tuple[float, range]]:
        """:func:`paced` ticks (now, the items due), noting how far behind each is."""
        for now, due, behind in paced(self._rate, self._duration, self.start_at, poll):
            self.behind_max_s = max(self.behind_max_s, behind)
            yield now, due


def wait_until(check: Callable[[], T | None], timeout: float, what: str, poll: float = 0.005) -> T:
    """Poll ``check`` until it returns something truthy; return it. TimeoutError after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(poll)


def percentile(values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile (``p`` in 0..100) of ``values``; ``inf`` entries
    stand for samples that never arrived (censored), so a result can be ``inf``."""
    if not values:
        return math.nan
    xs = sorted(values)
    rank = (len(xs) - 1) * p / 100
    lo, hi = math.floor(rank), math.ceil(rank)
    if math.isinf(xs[hi]):
        return math.inf
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def summarize(values: Sequence[float], scale: float = 1.0) -> dict[str, float | int]:
    """n, min, p50, p90, p99, max, mean of ``values`` times ``scale`` (e.g. 1000 for ms).

    ``inf`` entries (never arrived) count in n and push percentiles to ``inf``; the mean
    is over the finite ones.
    """
    finite = [v for v in values if math.isfinite(v)]
    out: dict[str, float | int] = {"n": len(values), "arrived": len(finite)}
    if not values:
        return out
    for name, p in (("min", 0.0), ("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("max", 100.0)):
        out[name] = _round(percentile(values, p) * scale)
    out["mean"] = _round(sum(finite) / len(finite) * scale) if finite else math.nan
    return out


def _round(x: float) -> float:
    return x if not math.isfinite(x) else round(x, 3)


def fmt_ms(x: float | int | None) -> str:
    """Milliseconds for tables: '3.2 ms', '25.1 s', '> cap' for inf."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return "never (> cap)"
    if x >= 1000:
        return f"{x / 1000:.1f} s"
    if x >= 100:
        return f"{x:.0f} ms"
    return f"{x:.1f} ms"


# --- processes -------------------------------------------------------------------------


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of process ``pid`` (all its threads), from
    /proc/<pid>/stat."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may contain spaces: split after its closing paren.
    fields = raw[raw.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of stat(5)
    return utime / CLK_TCK, stime / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads)."""
    return sum(cpu_split(pid))


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent busy since boot (user+nice+system+irq+softirq+steal),
    from /proc/stat: compared with our own processes' CPU, it shows other load."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` in MiB, from VmRSS in /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 2)
    raise RuntimeError(f"no VmRSS for pid {pid}")


def peak_rss_mib(pid: int) -> float:
    """Peak resident set size (VmHWM) of ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 2)
    return 0.0


def threads(pid: int) -> int:
    """Number of OS threads of ``pid``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def time_wait_sockets(port: int) -> int:
    """TCP sockets in TIME-WAIT with ``port`` at either end (IPv4, /proc/net/tcp): each is
    a connection closed in the last 60 s, so this counts connection churn."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state = fields[1], fields[2], fields[3]
        if state == "06" and port in (
            int(local.rsplit(":", 1)[1], 16),
            int(remote.rsplit(":", 1)[1], 16),
        ):
            count += 1
    return count


@attrs.define
class CpuWindow:
    """CPU seconds and wall time of one process over a window: ``start()``, then ``stop()``."""

    pid: int
    cpu0: float = 0.0
    sys0: float = 0.0
    wall0: float = 0.0
    cpu_s: float = 0.0
    wall_s: float = 0.0

    def start(self) -> CpuWindow:
        user, system = cpu_split(self.pid)
        self.cpu0, self.sys0, self.wall0 = user + system, system, time.monotonic()
        return self

    def stop(self) -> dict[str, float]:
        user, system = cpu_split(self.pid)
        self.cpu_s = user + system - self.cpu0
        self.wall_s = time.monotonic() - self.wall0
        return {
            "cpu_s": round(self.cpu_s, 3),
            # In the kernel: syscalls, and loopback TCP's delivery to the peer.
            "sys_s": round(system - self.sys0, 3),
            "wall_s": round(self.wall_s, 3),
            "cpu_pct": round(100 * self.cpu_s / self.wall_s, 2) if self.wall_s else math.nan,
        }


_PROBLEM = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback")


def log_problems(worker: WorkerProcess, limit: int = 20) -> list[str]:
    """Lines of the worker's log at WARNING or above (and tracebacks), first ``limit``."""
    return [ln for ln in worker.output().splitlines() if _PROBLEM.search(ln)][:limit]


def log_time(line: str) -> float:
    """Unix time of a worker log line ('2025-01-01 12:00:00,123 INFO ...': local time)."""
    stamp = line[:23]
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def line_time(worker: WorkerProcess, needle: str, after: float = 0.0) -> float | None:
    """Time of the first line of ``worker``'s log containing ``needle`` logged after
    ``after`` (unix time), or None. (Text logs: LOG_FORMAT text, the default.)"""
    for line in worker.output().splitlines():
        if needle in line:
            at = log_time(line)
            if at >= after:
                return at
    return None


def wait_line(worker: WorkerProcess, needle: str, timeout: float) -> float:
    """Wait for a line of ``worker``'s log containing ``needle``; return its time.
    RuntimeError if the worker exits first, TimeoutError after ``timeout`` seconds."""

    def seen() -> float | None:
        if not worker.alive:
            raise RuntimeError(f"worker exited\n{worker.output()[-3000:]}")
        return line_time(worker, needle)

    return wait_until(seen, timeout, f"{needle!r} in the log", poll=0.05)


# --- the setup every benchmark shares --------------------------------------------------


@attrs.define
class Rig:
    """One Redis, one backend, a temp dir for logs, and the workers spawned on them."""

    tmp: Path
    server: RedisServer
    backend: RecordingBackend
    client: redis.Redis
    workers: list[WorkerProcess] = attrs.Factory(list)

    def spawn(
        self,
        replica_id: str,
        *,
        counter_key: str = "c:*",
        lease_ttl_ms: int = 3000,
        max_in_flight: int = 32,
        log_level: str = "WARNING",
        module: str = "trio_counter_worker",
        extra_env: dict[str, str] | None = None,
        code: WorkerCode | None = None,
    ) -> WorkerProcess:
        """Start one ``python -m trio_counter_worker run`` replica against this rig
        (``module`` swaps in a wrapper such as bench.gc_probe), running ``code``'s worker
        package (default: :func:`measured_code`)."""
        env = {
            "REDIS_PORT": str(self.server.port),
            "RESET_ENDPOINT_URL": self.backend.url,
            "RESET_SECRET": SECRET,
            "COUNTER_KEY": counter_key,
            "LEASE_TTL_MS": str(lease_ttl_ms),
            "REPLICA_ID": replica_id,
            "MAX_IN_FLIGHT": str(max_in_flight),
            "LOG_LEVEL": log_level,
            **(extra_env or {}),
        }
        checkout = (code or measured_code()).checkout
        cwd = None if checkout is None else self._launch_dir(checkout)
        worker = WorkerProcess(env, self.tmp / f"{replica_id}.log", module=module, cwd=cwd)
        worker.start()
        self.workers.append(worker)
        return worker

    def _launch_dir(self, checkout: Path) -> Path:
        """A directory holding only a link to ``checkout``'s worker package, made once
        per rig: as a worker's working directory it comes first on ``sys.path`` (ahead
        of this tree, which PYTHONPATH adds), so ``python -m`` imports that package and
        everything else (``bench.gc_probe``, the lab) from here; it holds no ``.env``."""
        launch = self.tmp / f"code-{abs(hash(checkout.resolve())):x}"
        if not launch.exists():
            launch.mkdir()
            (launch / PACKAGE).symlink_to(checkout.resolve() / PACKAGE)
            if not _declares_hiredis(checkout):
                # Each side runs with the dependencies its own pyproject asks for: redis-py
                # uses hiredis whenever it imports, so a commit that did not install it
                # must not get it from this venv (the comparison would hide the change).
                (launch / "hiredis.py").write_text(_NO_HIREDIS)
            imported = subprocess.run(
                [sys.executable, "-c", f"import {PACKAGE} as m; print(m.__file__)"],
                cwd=launch,
                env=clean_env(),
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            if not imported.startswith(str(launch)):
                raise RuntimeError(
                    f"a worker started in {launch} imports {imported}, not {checkout}'s package"
                )
        return launch


_NO_HIREDIS = 'raise ImportError("hiredis hidden: this commit\'s pyproject does not install it")\n'


def _declares_hiredis(checkout: Path) -> bool:
    """Whether ``checkout``'s pyproject makes hiredis a dependency (``redis[hiredis]``)."""
    pyproject = checkout / "pyproject.toml"
    return pyproject.exists() and "hiredis" in pyproject.read_text()


# The lab's RecordingBackend keeps two socketserver defaults that a real backend
# does not have, and that would make the benchmarks measure the backend (both shown by
# bench/burst.py's calibration):
# - listen backlog 5: a worker opening 32 connections at once overflows it and gets
#   "connection reset by peer";
# - Nagle's algorithm on: the handler writes a response as two segments (headers, then
#   body), so on a busy keep-alive connection the body waits for the client's delayed
#   ACK: ~40 ms per request, ~23 requests/s per connection.
# Both are class attributes read when a server binds / a connection is set up, so they
# are set for as long as the backend lives.
BACKEND_BACKLOG = 1024


@attrs.frozen
class BackendTuning:
    backlog: int = BACKEND_BACKLOG
    nodelay: bool = True

    @property
    def label(self) -> str:
        nagle = "TCP_NODELAY" if self.nodelay else "Nagle on"
        return f"backlog {self.backlog}, {nagle}"


STOCK_BACKEND = BackendTuning(backlog=5, nodelay=False)  # socketserver's defaults
TUNED_BACKEND = BackendTuning()


@contextmanager
def backend_running(tuning: BackendTuning = TUNED_BACKEND) -> Iterator[RecordingBackend]:
    """A started RecordingBackend with ``tuning`` applied for its whole life."""
    server_cls, handler_cls = backend_module._Server, backend_module._Handler
    saved = server_cls.request_queue_size, handler_cls.disable_nagle_algorithm
    server_cls.request_queue_size = tuning.backlog
    handler_cls.disable_nagle_algorithm = tuning.nodelay
    backend = RecordingBackend()
    try:
        backend.start()
        yield backend
    finally:
        backend.close()
        server_cls.request_queue_size, handler_cls.disable_nagle_algorithm = saved


@contextmanager
def rig(name: str, redis_args: Sequence[str] = ()) -> Iterator[Rig]:
    """A fresh redis-server and RecordingBackend; every worker is killed on exit."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp_name:
        tmp = Path(tmp_name)
        server = RedisServer(tmp / "redis", extra_args=redis_args)
        server.start()
        try:
            with backend_running() as backend, server.client() as client:
                r = Rig(tmp, server, backend, client)
                try:
                    yield r
                finally:
                    for w in r.workers:
                        w.cleanup()
        finally:
            server.stop()


def lease_key(counter_key: str = "c:*") -> str:
    return Keys(counter_key).lease


def deadlines_key(counter_key: str = "c:*") -> str:
    return Keys(counter_key).deadlines


def pending_key(counter_key: str = "c:*") -> str:
    return Keys(counter_key).pending


def release_channel(counter_key: str = "c:*") -> str:
    return Keys(counter_key).released


def lease_holder(client: redis.Redis, counter_key: str = "c:*") -> str | None:
    """REPLICA_ID of the replica holding the lease, or None."""
    value: Any = client.hget(lease_key(counter_key), "replica")
    return str(value) if value else None


def numsub(client: redis.Redis, channel: str) -> int:
    """Subscribers of ``channel`` (standbys and leader all listen for lease releases)."""
    rows: Any = client.pubsub_numsub(channel)
    return int(rows[0][1]) if rows else 0


def numpat(client: redis.Redis) -> int:
    value: Any = client.pubsub_numpat()
    return int(value)


def wait_leader_ready(r: Rig, timeout: float = 30.0, counter_key: str = "c:*") -> str:
    """Wait until a replica holds the lease and is subscribed to the keyspace pattern;
    then prove the whole path works with one probe key and its reset (not kept)."""
    leader = wait_until(lambda: lease_holder(r.client, counter_key), timeout, "a leader")
    wait_until(lambda: numpat(r.client) >= 1, timeout, "the leader's keyspace subscription")
    probe = counter_key.replace("*", "probe")
    before = len(r.backend.requests)
    r.client.set(probe, "1", px=200)
    wait_until(
        lambda: any((q.json or {}).get("key") == probe for q in r.backend.requests[before:]),
        timeout,
        "the probe key's reset",
        poll=0.01,
    )
    r.backend.clear()
    return leader


def load_keys(
    client: redis.Redis,
    names: Iterable[str],
    *,
    ex: int | None = None,
    pxat: Callable[[int], int] | None = None,
) -> int:
    """SET each name with ``EX ex`` (or ``PXAT pxat(i)``) through non-transactional
    pipelines of PIPELINE_CHUNK commands; return how many were set."""
    count = 0
    pipe = client.pipeline(transaction=False)
    for i, name in enumerate(names):
        if pxat is not None:
            pipe.set(name, "1", pxat=pxat(i))
        else:
            pipe.set(name, "1", ex=ex)
        count += 1
        if count % PIPELINE_CHUNK == 0:
            pipe.execute()
    pipe.execute()
    pipe.reset()
    return count


def info(client: redis.Redis, section: str) -> dict[str, Any]:
    raw: Any = client.info(section)
    return dict(raw)


# --- results ---------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    binary = find_redis_server()
    version = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        **_code_version(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis_server": version,
        "mem_total_mib": _mem_total_mib(),
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def _code_version() -> dict[str, Any]:
    """The commit measured, and whether the worker or test-support code differed from it
    (for the checkout in $TCW_BENCH_CODE, when one is set)."""
    code = measured_code()
    version: dict[str, Any] = {
        "git_commit": _git_head(ROOT),
        "worker_code_modified": _modified(ROOT),
    }
    if code.checkout is not None:
        version["worker_code_checkout"] = str(code.checkout)
        version["worker_code_commit"] = _git_head(code.checkout)
        version["worker_code_modified"] = _modified(code.checkout)
    return version


def _git(cwd: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    return out.stdout.strip()


def _git_head(cwd: Path) -> str:
    return _git(cwd, "rev-parse", "HEAD") or "?"


def _modified(cwd: Path) -> bool:
    return bool(_git(cwd, "status", "--porcelain", "--", PACKAGE, "tests/support"))


def _mem_total_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 0


def write_result(name: str, data: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` (with machine info) and return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {"benchmark": name, "machine": machine_info(), **data}
    text = json.dumps(clean_json(payload), indent=2, default=_json_default, allow_nan=False)
    path.write_text(text + "\n")
    log(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path


def clean_json(obj: Any) -> Any:
    """``obj`` with non-finite floats replaced by None (strict JSON has no inf/NaN): a
    None percentile means "beyond the cap" (some samples never arrived)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean_json(v) for v in obj]
    return obj


def _json_default(obj: object) -> Any:
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    if attrs.has(type(obj)):
        return attrs.asdict(obj)  # type: ignore[arg-type]
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# --- another commit's worker, run side by side with the working tree's ----------------

BASE_COMMIT = "9092cec"  # before isolated deliveries and the decision queue
PACKAGE = "trio_counter_worker"


@attrs.frozen
class WorkerCode:
    """The worker code a replica runs: the ``trio_counter_worker`` package of
    ``checkout`` (another commit's tree), or of the working tree when it is None."""

    label: str
    commit: str
    checkout: Path | None = None


def measured_code(label: str = "new") -> WorkerCode:
    """The code a benchmark measures unless told otherwise: the checkout named by
    $TCW_BENCH_CODE (bench/compare.py sets it), else the working tree. Labelled with its
    commit (``+modified`` if its worker code differs from it)."""
    raw = os.environ.get(CODE_ENV)
    checkout = Path(raw).resolve() if raw else None
    where = checkout or ROOT
    commit = _git_head(where)[:12] + ("+modified" if _modified(where) else "")
    return WorkerCode(label, commit, checkout)


@contextmanager
def code_at(commit: str, label: str = "old") -> Iterator[WorkerCode]:
    """``commit`` checked out (``git worktree add --detach``) in a temp dir for as long as
    the block runs, and removed again; the working tree is not touched."""
    full = _git(ROOT, "rev-parse", "--verify", f"{commit}^{{commit}}")
    if not full:
        raise ValueError(f"{commit!r} is not a commit of {ROOT}")
    with tempfile.TemporaryDirectory(prefix=f"tcw-{full[:7]}-") as tmp_name:
        tree = Path(tmp_name) / "tree"
        subprocess.run(
            ["git", "worktree", "add", "--quiet", "--detach", str(tree), full], cwd=ROOT, check=True
        )
        try:
            yield WorkerCode(label, full[:12], tree)
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False
            )


def ratio(new: float | int | None, old: float | int | None) -> float | None:
    """``new / old`` rounded, or None when either is missing, infinite or old is 0."""
    if new is None or old is None:
        return None
    if not (math.isfinite(new) and math.isfinite(old)) or old == 0:
        return None
    return round(new / old, 3)
