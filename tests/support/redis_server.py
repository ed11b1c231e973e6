"""The tests' import path of the lab's throwaway ``redis-server``
(:mod:`trio_counter_worker.lab.servers`)."""

from trio_counter_worker.lab.servers import HOST, SERVER_ENV, RedisServer, debug_args, free_port
from trio_counter_worker.lab.servers import redis_server_binary as find_redis_server

__all__ = ["HOST", "SERVER_ENV", "RedisServer", "debug_args", "find_redis_server", "free_port"]
