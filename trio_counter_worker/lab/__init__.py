"""Operator tooling: the ``demo`` and ``chaos`` commands and what they start and watch.

- :mod:`.servers`: throwaway ``redis-server`` processes, and a Sentinel setup;
- :mod:`.backend`: the recording HTTP backend (hostile behaviours on demand) and the
  reset ledger a real backend would keep;
- :mod:`.replicas`: replica processes and their JSON logs; the lease as an operator
  reads it;
- :mod:`.faultproxy`: a fault-injecting TCP proxy;
- :mod:`.simulator`: the app (counters set, re-armed, left to expire) and its episodes;
- :mod:`.demo`, :mod:`.chaos`: the commands.

The worker never imports this package; it uses the worker's public helpers only. Plain
threads and subprocesses (trio only where the tests await the backend): tools around the
worker, not the worker.
"""
