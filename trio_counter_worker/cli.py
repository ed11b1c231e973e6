"""Command line: ``trio-counter-worker [run]`` and ``python -m trio_counter_worker``."""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
from collections.abc import Sequence
from functools import partial

import trio

from . import __version__
from .config import SETTINGS, Config
from .errors import ConfigError, RedisRefused, RedisUnavailable, first_error
from .logs import configure_logging
from .ops import install_command, print_checks, print_status, run_checks, run_redeliver, run_status
from .worker import open_worker

__all__ = ["main"]

log = logging.getLogger("trio_counter_worker")
PROG = "trio-counter-worker"


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


async def _watch_signals(cancel_scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s: stopping", signal.Signals(signum).name)
            cancel_scope.cancel()
            return


async def _run(config: Config) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, nursery.cancel_scope)
        async with open_worker(config) as worker:
            await worker.run()


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
    if args.command == "install-functions":
        return install_command(config, args.counter_key)
    if args.command == "check":
        checks = trio.run(partial(run_checks, config, dry_run_request=args.dry_run_request))
        return print_checks(checks, sys.stdout)
    if args.command in ("status", "redeliver"):
        try:
            if args.command == "redeliver":
                queued = trio.run(run_redeliver, config, args.reset_ids)
                sys.stdout.write(f"{queued} dead reset(s) queued again\n")
                return 0 if queued or not args.reset_ids else 1
            status = trio.run(run_status, config)
        except ConfigError as exc:
            return _fail(exc)
        except RedisRefused as exc:  # its message says what to do
            if isinstance(start_error := exc.at_start(), ConfigError):
                return _fail(start_error)
            sys.stderr.write(f"{PROG}: error: {exc}\n")
            return 1
        except RedisUnavailable as exc:
            sys.stderr.write(f"{PROG}: error: {exc} (check REDIS_HOST/REDIS_PORT or REDIS_URL)\n")
            return 1
        print_status(status, args.json, sys.stdout)
        return 0
    summary = configure_logging(config.log_level, config.log_format, config.log_resets)
    for notice in config.notices:
        log.warning(notice)
    if config.overridden:
        log.warning(
            "REDIS_URL overrides %s: their values are ignored; unset them, or REDIS_URL",
            ", ".join(config.overridden),
        )
    # Everything imported so far lives for the whole run: keep it out of the full
    # collections, whose pauses would otherwise show up in reset latency.
    gc.freeze()
    failure: ConfigError | None = None
    try:
        trio.run(_run, config)
    except* ConfigError as group:
        failure = first_error(group)  # type: ignore[assignment]
    finally:
        if summary is not None:
            summary.flush()
    return 0 if failure is None else _fail(failure)


def _fail(exc: ConfigError) -> int:
    """One line on stderr, exit code 2: bad configuration is not worth a traceback."""
    sys.stderr.write(f"{PROG}: error: {exc}\n")
    return 2
