"""The nemeses: each injects one family of faults and follows it up.

:mod:`.leader` (kill, term, stop), :mod:`.backend` (http5xx, httphang, poison),
:mod:`.flags`, :mod:`.network` (slow, partition), :mod:`.restart` (redis, failover).
"""

from __future__ import annotations

from ..driver import AppDriver
from ..fleet import Fleet
from ..stage import Stage
from .backend import BackendNemesis
from .base import Fired, Nemesis
from .flags import FlagsNemesis
from .leader import LeaderNemesis
from .network import NetworkNemesis
from .restart import RestartNemesis

__all__ = [
    "BackendNemesis",
    "Fired",
    "FlagsNemesis",
    "LeaderNemesis",
    "Nemesis",
    "NetworkNemesis",
    "RestartNemesis",
    "nemeses",
]


def nemeses(stage: Stage, fleet: Fleet, driver: AppDriver) -> list[Nemesis]:
    """One of each, in the order their follow-ups run."""
    kinds = (LeaderNemesis, NetworkNemesis, RestartNemesis, BackendNemesis, FlagsNemesis)
    return [kind(stage, fleet, driver) for kind in kinds]
