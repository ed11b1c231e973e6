"""The tests' import path of the lab's Sentinel setup
(:mod:`trio_counter_worker.lab.servers`)."""

from trio_counter_worker.lab.servers import MASTER_NAME, SentinelSetup

__all__ = ["MASTER_NAME", "SentinelSetup"]
