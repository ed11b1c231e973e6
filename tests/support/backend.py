"""The tests' import path of the lab's recording backend
(:mod:`trio_counter_worker.lab.backend`)."""

from trio_counter_worker.lab.backend import (
    ApplyThenDrop,
    Behaviour,
    Chooser,
    Drip,
    Endless,
    Hang,
    HeadersThenNothing,
    Huge,
    Received,
    RecordingBackend,
    ResetLedger,
    ResetPost,
    Respond,
    by_key,
)

__all__ = [
    "ApplyThenDrop",
    "Behaviour",
    "Chooser",
    "Drip",
    "Endless",
    "Hang",
    "HeadersThenNothing",
    "Huge",
    "Received",
    "RecordingBackend",
    "ResetLedger",
    "ResetPost",
    "Respond",
    "by_key",
]
