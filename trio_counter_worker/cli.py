"""Command line: ``trio-counter-worker [run]`` and ``python -m trio_counter_worker``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

import trio

from . import __version__
from .config import SETTINGS, Config
from .errors import ConfigError, first_error
from .logs import configure_logging
from .worker import open_worker

__all__ = ["main"]

log = logging.getLogger("trio_counter_worker")
PROG = "trio-counter-worker"


def _settings_help() -> str:
    lines = ["settings (environment variables, or a .env file; the environment wins):"]
    for s in SETTINGS:
        default = "" if s.default is None else f" [default: {s.default}]"
        lines.append(f"  {s.name:<20} {s.help}{default}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Leader-elected worker: POSTs a reset when a Redis activity key expires.",
        epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--env-file", default=".env",
                        help="file to read settings from, if it exists [default: .env]")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("run", help="run one replica until SIGTERM/SIGINT (the default)",
                   epilog=_settings_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
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
    args = _parser().parse_args(argv)
    try:
        config = Config.from_env(env_file=args.env_file)
    except ConfigError as exc:
        return _fail(exc)
    configure_logging(config.log_level, config.log_format)
    failure: ConfigError | None = None
    try:
        trio.run(_run, config)
    except* ConfigError as group:
        failure = first_error(group)  # type: ignore[assignment]
    return 0 if failure is None else _fail(failure)


def _fail(exc: ConfigError) -> int:
    """One line on stderr, exit code 2: bad configuration is not worth a traceback."""
    sys.stderr.write(f"{PROG}: error: {exc}\n")
    return 2
