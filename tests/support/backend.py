"""The tests' import path of the lab's recording backend
(:mod:`trio_counter_worker.lab.backend`)."""

from trio_counter_worker.lab.backend import *  # noqa: F403
from trio_counter_worker.lab.backend import __all__ as __all__
