"""Command line: ``trio-counter-worker [run]`` and ``python -m trio_counter_worker``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._version import PROG, __version__
from .config import SETTINGS, Config
from .errors import ConfigError

__all__ = ["main"]


def _settings_help() -> str:
    lines = ["settings (environment variables, or a .env file; the environment wins):"]
    for s in SETTINGS:
        if s.required:
            note = "(required)"
        else:
            note = "(optional)" if s.default is None else f"[default: {s.default}]"
        lines.append(f"  {s.name:<20} {s.help} {note}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Leader-elected worker: POSTs a reset when a Redis activity key expires.",
        epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--env-file",
        default=None,
        metavar="PATH",
        help="file to read settings from; it must exist [default: .env in "
        "the working directory, if there is one]",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser(
        "run",
        help="run one replica until SIGTERM/SIGINT (the default)",
        epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check = sub.add_parser(
        "check",
        help="check the settings, Redis and the reset endpoint, "
        "without sending a reset; exit 0 only if nothing failed",
    )
    check.add_argument(
        "--dry-run-request",
        action="store_true",
        help="send the dry-run POST (x-reset-dry-run: 1) to verify "
        "RESET_SECRET even if the backend does not advertise support",
    )
    status = sub.add_parser(
        "status", help="who leads, fencing token, pending resets, watched counters, next deadline"
    )
    status.add_argument("--json", action="store_true", help="print one JSON object")
    redeliver = sub.add_parser(
        "redeliver",
        help="queue dead resets (given up on after "
        "RESET_GIVE_UP_AFTER) again, under their own reset_id",
    )
    redeliver.add_argument(
        "reset_ids", nargs="*", metavar="RESET_ID", help="which ones (see `status`) [default: all]"
    )
    functions = sub.add_parser(
        "install-functions",
        help="load the Redis Functions library "
        "tcw (FCALL tcw_touch / tcw_done; Redis 7.0+, not Cluster)",
    )
    functions.add_argument(
        "--counter-key",
        metavar="PATTERN",
        help="register the deployment with this COUNTER_KEY, so "
        "tcw_touch records its keys' deadlines",
    )
    demo = sub.add_parser(
        "demo",
        help="see it work: embedded Redis, a reference backend, "
        "three replicas, a leader killed; nothing to install or start",
    )
    demo.add_argument(
        "--replicas",
        type=int,
        default=3,
        metavar="N",
        help="number of worker processes to start, at least 1 [default: 3]",
    )
    demo.add_argument(
        "--duration",
        type=float,
        default=25.0,
        metavar="SECONDS",
        help="how long the demo app stays active, in seconds, from the first "
        "election; the faults come at its thirds [default: 25]",
    )
    sub.add_parser(
        "chaos",
        add_help=False,
        help="verify the guarantees: replicas, a "
        "recording backend and injected faults; exit non-zero if a reset was "
        "missed or doubled (chaos --help for its options)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 stopped cleanly, 2 bad configuration)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["chaos"]:  # its own options, parsed by chaos itself
        from .lab.chaos import chaos_main

        return chaos_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from .lab.demo import demo_main

        return demo_main(replicas=args.replicas, duration=args.duration)
    try:
        config = Config.from_env(
            env_file=".env" if args.env_file is None else args.env_file,
            required_file=args.env_file is not None,
            # status, redeliver and install-functions use Redis only: no endpoint needed
            redis_only=args.command in ("status", "redeliver", "install-functions"),
        )
    except ConfigError as exc:
        return _fail(exc)
    # Imported once the settings hold: a bad one exits 2 before trio, redis-py and the
    # leader's modules are loaded (~0.1 s of CPU instead of ~0.5 s).
    from .commands import carry_out

    try:
        return carry_out(args, config)
    except ConfigError as exc:
        return _fail(exc)


def _fail(exc: ConfigError) -> int:
    """One line on stderr, exit code 2: bad configuration is not worth a traceback."""
    sys.stderr.write(f"{PROG}: error: {exc}\n")
    return 2
