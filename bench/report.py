"""Turn bench/results/*.json into markdown tables (bench/results/summary.md).

.venv/bin/python -m bench.report
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .common import RESULTS_DIR, fmt_ms

OUT = RESULTS_DIR / "summary.md"


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _ms(summary: dict[str, Any], key: str) -> str:
    value = summary.get(key, "missing")
    if value == "missing":
        return "-"
    return fmt_ms(float("inf") if value is None else value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def latency(d: dict[str, Any]) -> list[str]:
    rows = []
    for s in d["scenarios"]:
        w, r = s["worker"], s["reference"]
        rows.append(
            [
                f"{s['other_keys']:,}",
                _ms(w["latency_ms"], "p50"),
                _ms(w["latency_ms"], "p99"),
                _ms(w["latency_ms"], "max"),
                f"{w['resets_received']}/{s['keys_per_side']}",
                str(w["duplicate_posts"]),
                _ms(r["latency_ms"], "p50"),
                _ms(r["latency_ms"], "p99"),
                _ms(r["latency_ms"], "max"),
                f"{r['never_arrived']}/{s['keys_per_side']}",
            ]
        )
    return [
        "## Latency",
        "",
        *_table(
            [
                "other TTL keys",
                "worker p50",
                "worker p99",
                "worker max",
                "resets",
                "dup POSTs",
                "Redis p50",
                "Redis p99",
                "Redis max",
                f"Redis never (cap {d['params']['cap_s']:.0f} s)",
            ],
            rows,
        ),
    ]


def failover(d: dict[str, Any]) -> list[str]:
    rows = []
    for res in d["results"]:
        for kind in ("SIGKILL", "SIGTERM"):
            k = res[kind]
            extra = ""
            if kind == "SIGKILL":
                extra = (
                    f"lease left p50 {_ms(k['lease_left_ms'], 'p50')}; "
                    f"after expiry p50 {_ms(k['after_expiry_ms'], 'p50')}, "
                    f"max {_ms(k['after_expiry_ms'], 'max')}"
                )
            rows.append(
                [
                    f"{res['lease_ttl_ms']} ms",
                    kind,
                    str(len(k["rounds"])),
                    _ms(k["poll_ms"], "p50"),
                    _ms(k["poll_ms"], "max"),
                    f"{k['max_over_ttl']}" if k["max_over_ttl"] is not None else "-",
                    extra,
                ]
            )
    return [
        "## Failover",
        "",
        *_table(["lease", "fault", "n", "p50", "max", "max / lease", "notes"], rows),
    ]


def burst(d: dict[str, Any]) -> list[str]:
    rows = []
    for run in d["runs"]:
        rows.append(
            [
                str(run["max_in_flight"]),
                f"{run.get('drain_s', '-')} s",
                str(run.get("resets_per_s", "-")),
                _ms(run["latency_ms"], "p50"),
                _ms(run["latency_ms"], "p99"),
                f"{run['distinct_keys']}/{run['keys']}",
                str(run["distinct_reset_ids"]),
                str(run["posts"]),
                str(run["missing_keys"]),
                f"{run['burst_cpu']['cpu_pct']} %",
                str(run["burst_cpu_ms_per_reset"]),
                f"{run.get('backend_cpu_pct', '-')} %",
                f"{run.get('redis_cpu_pct', '-')} %",
                f"{run.get('other_processes_cpu_pct', '-')} %",
                str(run["connections_closed"]),
                f"{run['rss_mib']['after']} MiB",
            ]
        )
    cal_rows = [
        [
            c["backend"],
            str(c["concurrency"]),
            str(c["keepalive_pool"]),
            str(c["req_per_s"]),
            json.dumps(c["errors"]) if c["errors"] else "none",
            str(c["connections_closed"]),
            f"{c['backend_cpu_pct']} %",
            f"{c['client_cpu_pct']} %",
            str(c["client_cpu_ms_per_request"]),
        ]
        for c in d["backend_calibration"]
    ]
    return [
        "## Burst",
        "",
        *_table(
            [
                "MAX_IN_FLIGHT",
                "drain",
                "resets/s",
                "latency p50",
                "latency p99",
                "keys reset",
                "reset_ids",
                "POSTs",
                "missing",
                "worker CPU",
                "CPU ms/reset",
                "backend CPU",
                "Redis CPU",
                "other CPU",
                "conns closed",
                "RSS after",
            ],
            rows,
        ),
        "",
        "Backend calibration (bench/http_load.py, another process):",
        "",
        *_table(
            [
                "backend",
                "concurrency",
                "keep-alive pool",
                "req/s",
                "errors",
                "conns closed",
                "backend CPU",
                "client CPU",
                "client CPU ms/req",
            ],
            cal_rows,
        ),
    ]


def idle(d: dict[str, Any]) -> list[str]:
    a = d["attribution"]
    rows = [
        [
            role,
            str(v["commands_per_s"]),
            str(v["round_trips_per_s"]),
            f"{v['cpu_pct']} %",
            f"{v['rss_mib']} MiB",
        ]
        for role, v in a.items()
    ]
    pa, pb = d["phase_a_leader_only"], d["phase_b_leader_and_2_standbys"]
    return [
        "## Idle",
        "",
        *_table(["replica", "Redis commands/s", "round trips/s", "CPU", "RSS"], rows),
        "",
        f"Phase A calls/s: {pa['calls_per_s']}; Redis CPU {pa['redis_cpu_pct']} %; "
        f"connections {pa['redis_connections']}",
        "",
        f"Phase B calls/s: {pb['calls_per_s']}; Redis CPU {pb['redis_cpu_pct']} %; "
        f"connections {pb['redis_connections']}",
    ]


def scale(d: dict[str, Any]) -> list[str]:
    rows = []
    for run in d["runs"]:
        rec, live = run["reconcile"], run["live_events"]
        mem = run["redis_used_memory_bytes"]
        rows.append(
            [
                f"{run['counters']:,}",
                f"{rec['acquired_to_reconciled_s']} s",
                f"{rec['rss_mib']} MiB",
                f"{run['idle_after_reconcile']['cpu_pct']} %",
                f"{live['all_tracked_after_s']} s",
                str(live["rearms_per_s"]),
                f"{live['cpu']['cpu_pct']} %",
                f"{live['rss_mib']} MiB",
                f"{run['idle_after_live']['cpu_pct']} %",
                f"{(mem['after_reconcile'] - mem['keys_loaded']) / 2**20:.1f} MiB",
                f"{live['max_pubsub_omem_bytes'] / 2**20:.1f} MiB",
                "; ".join(
                    f"{name.removeprefix('c:probe:')}: "
                    + (f"+{p['late_ms']} ms" if p["resets"] == 1 else f"{p['resets']} resets")
                    for name, p in run["short_ttl_probes"].items()
                ),
            ]
        )
    return [
        "## Scale",
        "",
        *_table(
            [
                "counters",
                "reconcile",
                "RSS after reconcile",
                "idle CPU",
                "re-arm all: tracked in",
                "re-arms/s",
                "CPU then",
                "RSS after",
                "idle CPU after",
                "Redis memory for deadlines",
                "peak pub/sub buffer",
                "short-TTL probes: reset after deadline",
            ],
            rows,
        ),
    ]


def gcpause(d: dict[str, Any]) -> list[str]:
    pauses = ", ".join(f"{c['ms']:.1f} ms" for c in d["full_collections"]) or "none"
    return [
        "## GC pauses",
        "",
        f"{d['resets']} resets, latency p50 {_ms(d['latency_ms'], 'p50')}, "
        f"p99 {_ms(d['latency_ms'], 'p99')}, max {_ms(d['latency_ms'], 'max')}; "
        f"{len(d['slow_resets'])} resets slower than {d['slow_threshold_ms']} ms, "
        f"{d['slow_resets_with_gc_overlap']} of them during a garbage collection; "
        f"full collections: {pauses}.",
    ]


def build() -> str:
    parts: list[str] = ["# Benchmark summary (generated by bench/report.py)", ""]
    machine = None
    for name, fn in (
        ("latency", latency),
        ("failover", failover),
        ("burst", burst),
        ("idle", idle),
        ("scale", scale),
        ("gcpause", gcpause),
    ):
        d = _load(name)
        if d is None:
            parts += [f"## {name.capitalize()}", "", "(no results)", ""]
            continue
        machine = machine or d["machine"]
        parts += [*fn(d), "", f"Problems flagged: {d.get('problems') or 'none'}", ""]
    if machine:
        parts.insert(2, f"Machine and code: {json.dumps(machine)}\n")
    return "\n".join(parts)


def write(out: Path = OUT) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(build())
    return out


def main() -> None:
    print(write().read_text())


if __name__ == "__main__":
    main()
