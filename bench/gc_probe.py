"""Run ``trio_counter_worker`` exactly as ``python -m trio_counter_worker`` does, with a
``gc.callbacks`` hook that appends every garbage collection taking >= 1 ms (and every
full, generation-2 one) to the file named by ``GC_PROBE_OUT``, one line each:

    <unix time at the end> <generation> <duration ms> <objects collected>

Used by bench/gcpause.py as the worker's module (``python -m bench.gc_probe run``).
"""

from __future__ import annotations

import gc
import os
import runpy
import sys
import time
from typing import Any

_started: list[float] = [0.0]


def _hook(out: Any) -> Any:
    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            _started[0] = time.perf_counter()
            return
        ms = (time.perf_counter() - _started[0]) * 1000
        if ms >= 1.0 or info["generation"] == 2:
            out.write(f"{time.time():.6f} {info['generation']} {ms:.3f} {info['collected']}\n")

    return callback


def main() -> None:
    out = open(os.environ["GC_PROBE_OUT"], "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    gc.callbacks.append(_hook(out))
    sys.argv = ["trio_counter_worker", *sys.argv[1:]]
    runpy.run_module("trio_counter_worker", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
