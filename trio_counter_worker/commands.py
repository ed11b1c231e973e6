"""What each command does once its settings hold (:mod:`.cli` reads them first). A
ConfigError found on the way (at start-up, from Redis) is raised for the CLI to print."""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
from functools import partial
from typing import NoReturn

import trio

from ._version import PROG
from .config import Config
from .errors import ConfigError, RedisRefused, RedisUnavailable, first_error
from .logs import ResetSummary, configure_logging
from .ops import install_command, print_checks, print_status, run_checks, run_redeliver, run_status
from .worker import open_worker

__all__ = ["carry_out"]

log = logging.getLogger("trio_counter_worker")


def carry_out(args: argparse.Namespace, config: Config) -> int:
    """Run ``args.command`` (None: run a replica); the exit code."""
    if args.command == "install-functions":
        return install_command(config, args.counter_key)
    if args.command == "check":
        checks = trio.run(partial(run_checks, config, dry_run_request=args.dry_run_request))
        return print_checks(checks, sys.stdout)
    if args.command in ("status", "redeliver"):
        return _status_or_redeliver(args, config)
    return _run_replica(config)


def _status_or_redeliver(args: argparse.Namespace, config: Config) -> int:
    try:
        if args.command == "redeliver":
            queued = trio.run(run_redeliver, config, args.reset_ids)
            sys.stdout.write(f"{queued} dead reset(s) queued again\n")
            return 0 if queued or not args.reset_ids else 1
        status = trio.run(run_status, config)
    except RedisRefused as exc:  # its message says what to do
        if isinstance(start_error := exc.at_start(), ConfigError):
            raise start_error from None
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 1
    except RedisUnavailable as exc:
        sys.stderr.write(f"{PROG}: error: {exc} (check REDIS_HOST/REDIS_PORT or REDIS_URL)\n")
        return 1
    print_status(status, args.json, sys.stdout)
    return 0


def _run_replica(config: Config) -> int:
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
        trio.run(_run, config, summary)
    except* ConfigError as group:
        failure = first_error(group)  # type: ignore[assignment]
    finally:
        if summary is not None:
            summary.flush()
    if failure is not None:
        raise failure
    return 0


async def _run(config: Config, summary: ResetSummary | None) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, nursery.cancel_scope)
        if summary is not None:
            nursery.start_soon(_tick, summary)
        async with open_worker(config) as worker:
            await worker.run()


async def _tick(summary: ResetSummary) -> NoReturn:
    while True:
        await trio.sleep(summary.every)
        summary.tick()


async def _watch_signals(cancel_scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s: stopping", signal.Signals(signum).name)
            cancel_scope.cancel()
            return
