"""``trio-counter-worker chaos``: check the guarantees on this machine, under faults.

:mod:`.options` (the command line), :mod:`.run` (the run), :mod:`.report` (what it
counted). ``python -m trio_counter_worker.lab.chaos`` runs it too.
"""

from ..simulator import Episode, match_posts
from .options import FAULT_KINDS, Options, parse_options
from .report import Report, format_report, percentiles
from .run import chaos_main

__all__ = [
    "FAULT_KINDS",
    "Episode",
    "Options",
    "Report",
    "chaos_main",
    "format_report",
    "match_posts",
    "parse_options",
    "percentiles",
]
