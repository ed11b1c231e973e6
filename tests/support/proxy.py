"""The fault-injecting TCP proxy the tests put between a client and Redis or the backend.

It lives in the package (:mod:`trio_counter_worker.lab.faultproxy`), because the ``chaos``
command uses it too; this module keeps the tests' import path.
"""

from trio_counter_worker.lab.faultproxy import FaultProxy

__all__ = ["FaultProxy"]
