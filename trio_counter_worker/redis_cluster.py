"""Redis Cluster: the same Store, with each counter decision split in two.

On a cluster a counter key and the worker's own keys live in different slots, and no
script may span slots: a probe runs on the counter key's own node and a lease-checked
script applies its facts in the worker's slot (scripts.PROBE, APPLY_TRACK, APPLY_CLAIM).
Keyspace events are per node, so the leader subscribes on every primary and
resynchronises when the set of primaries changes. See docs/CLUSTER.md.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.exceptions as rexc
import trio

from . import scripts
from .config import Config
from .errors import FunctionsUnavailable, RedisUnavailable
from .redis_bridge import (
    REACHABLE_POLL,
    RedisBridge,
    client_kwargs,
    ensure_on,
)
from .redis_replies import outcomes, reported_args
from .store import KeyOutcome, Message, NotificationStatus

__all__ = ["ClusterBridge"]

_TOPOLOGY_EVERY = 2.0  # how often the leader checks the set of primaries
_REDIRECTS = 5  # MOVED/ASK followed per probe before resynchronising instead


class ClusterBridge(RedisBridge):
    """Redis Cluster: the same Store, with each counter decision split in two.

    The lease, epoch, deadlines and pending resets share one hash slot (the braces in the
    namespace), so their scripts run as on one Redis. A counter key lives in any slot: it
    is probed on its own node (scripts.PROBE, batched per node in a pipeline) and the
    facts are applied, lease-checked, in the worker's slot. Keyspace events are per
    node: the leader subscribes on every primary and resynchronises when the set of
    primaries changes.
    """

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._flagged: set[str] = set()  # nodes whose flags were verified, by name
        self._shard_order: tuple[object, list[Any]] = (None, [])  # (slot map, _shards())
        for name in ("APPLY_TRACK", "APPLY_CLAIM"):
            self._scripts[name] = self._client.register_script(getattr(scripts, name))

    async def install_functions(self) -> str:
        raise FunctionsUnavailable("the tcw library does not support Redis Cluster yet")

    def _load_scripts_sync(self) -> None:
        # redis-py sends SCRIPT LOAD to every primary; a cluster pipeline would not.
        for script in self._scripts.values():
            self._client.script_load(script.script)

    def _key_facts_sync(self, keys: list[str]) -> list[Any]:
        """Facts (key, now, pttl, expire_at) for each key, one pipeline per node.

        Slots move while the worker runs (resharding, failovers), so a probe may meet a
        redirection: ``MOVED`` (the slot has a new owner: the slot map is refreshed and
        the key probed there) or ``ASK`` (the slot is being migrated and the key is not
        on the source any more: probed on the target, after ``ASKING``). Redis decides
        where the key is; the probe is never answered from a node that does not own it.
        """
        facts: dict[str, list[Any]] = {}
        todo: dict[str, tuple[str, int] | None] = dict.fromkeys(keys)  # key -> ASK target
        for _ in range(_REDIRECTS):
            by_node: dict[str, tuple[Any, list[tuple[str, bool]]]] = {}
            for key, ask in todo.items():
                node = self._node_at(*ask) if ask else self._client.get_node_from_key(key)
                by_node.setdefault(node.name, (node, []))[1].append((key, ask is not None))
            todo = {}
            moved = False
            for node, probes in by_node.values():
                for (key, _), reply in zip(probes, self._probe_on(node, probes), strict=True):
                    if isinstance(reply, rexc.MovedError):  # before AskError: a subclass
                        moved = True
                        todo[key] = None
                    elif isinstance(reply, rexc.AskError):
                        todo[key] = (reply.host or node.host, int(reply.port))
                    elif isinstance(reply, Exception):
                        raise reply
                    else:
                        now, pttl, at = reply
                        facts[key] = [key, now, pttl, at]
            if not todo:
                return [v for key in keys for v in facts[key]]
            if moved:
                self._client.nodes_manager.initialize()
        raise RedisUnavailable(
            f"Redis Cluster kept redirecting {len(todo)} counter key(s) "
            f"({_REDIRECTS} times): slots moving; retrying after a resynchronisation"
        )

    def _probe_on(self, node: Any, probes: list[tuple[str, bool]]) -> list[Any]:
        """PROBE each key on ``node`` in one pipeline (ASKING first where asked to);
        a redirection comes back as the key's reply, not raised."""
        pipe = self._client.get_redis_connection(node).pipeline(transaction=False)
        for key, asking in probes:
            if asking:
                pipe.execute_command("ASKING")
            pipe.eval(scripts.PROBE, 1, key)
        replies = iter(pipe.execute(raise_on_error=False))
        out = []
        for _, asking in probes:
            if asking:
                next(replies)  # ASKING's OK (or its error, which the probe repeats)
            out.append(next(replies))
        return out

    def _node_at(self, host: str, port: int) -> Any:
        node = self._client.get_node(host=host, port=port)
        if node is None:  # a node added since the slot map was read
            self._client.nodes_manager.initialize()
            node = self._client.get_node(host=host, port=port)
        if node is None:
            raise RedisUnavailable(f"Redis Cluster redirected to unknown node {host}:{port}")
        return node

    async def track(self, holder: str, keys: list[str]) -> list[KeyOutcome]:
        if not keys:
            return []
        facts = await self._run(self._key_facts_sync, keys)
        raw = await self._script(
            "APPLY_TRACK", [self.keys.lease, self.keys.deadlines, self.keys.seen], [holder, *facts]
        )
        return outcomes(raw, keys)

    async def claim(
        self,
        holder: str,
        keys: list[str],
        expired_after: list[int] | None = None,
        heard: bool = False,
    ) -> list[KeyOutcome]:
        if not keys:
            return []
        facts = await self._run(self._key_facts_sync, keys)
        reported = reported_args(keys, expired_after, heard)
        args = [v for i in range(len(keys)) for v in (*facts[4 * i : 4 * i + 4], reported[i])]
        raw = await self._script(
            "APPLY_CLAIM",
            [
                self.keys.lease,
                self.keys.deadlines,
                self.keys.pending,
                self.keys.seen,
                self.keys.claimed,
            ],
            [holder, self._config.namespace, *args],
        )
        return outcomes(raw, keys)

    def _primaries(self) -> list[Any]:
        return sorted(self._client.get_primaries(), key=lambda n: n.name)

    def _fresh_primaries(self) -> list[Any]:
        """The primaries as the cluster names them now (redis-py's map is refreshed only
        after its own commands fail, so a node that died under a subscription, or a
        replica promoted since, would not show)."""
        self._client.nodes_manager.initialize()
        return self._primaries()

    async def wait_until_reachable(self) -> None:
        """Return once every slot has a primary that answers: a cluster whose primary
        died answers on its other nodes (CLUSTERDOWN) until a replica is promoted, and
        only then can the worker resubscribe everywhere."""
        while True:
            try:
                await self._run(self._reachable_sync)
                return
            except RedisUnavailable:
                await trio.sleep(REACHABLE_POLL)

    def _reachable_sync(self) -> None:
        for node in self._fresh_primaries():
            self._client.get_redis_connection(node).ping()

    def _shards(self, fresh: bool) -> list[Any]:
        """The primaries in the order of the slots they serve (each by its lowest): a
        replica promoted in a failover takes its old primary's place, where an order by
        name would move every node after it. Computed again when the slot map changes;
        ``fresh``: the map is read from the cluster first (redis-py refreshes it only after
        its own commands fail)."""
        if fresh:
            self._client.nodes_manager.initialize()
        slots = self._client.nodes_manager.slots_cache
        if self._shard_order[0] is not slots:
            first: dict[str, tuple[int, Any]] = {}
            for slot, nodes in slots.items():
                if nodes and (nodes[0].name not in first or slot < first[nodes[0].name][0]):
                    first[nodes[0].name] = (slot, nodes[0])
            self._shard_order = (slots, [node for _, node in sorted(first.values())])
        return self._shard_order[1]

    async def scan(self, pattern: str, cursor: int) -> tuple[int, list[str]]:
        """SCAN every primary in turn; the low byte of the cursor is the node's place in
        :meth:`_shards`, so a failover mid-scan neither skips nor repeats a primary."""
        nodes = await self._run(self._shards, cursor == 0)  # a new scan: a fresh map
        if not nodes:  # not "no keys": redis-py empties its map while refreshing it
            raise RedisUnavailable("the cluster's slot map is empty (being refreshed)")
        index, node_cursor = cursor & 0xFF, cursor >> 8
        if index >= len(nodes):
            return 0, []
        client = self._client.get_redis_connection(nodes[index])
        next_cursor, keys = await self._run(client.scan, node_cursor, pattern, 1000)
        if int(next_cursor) == 0:
            index += 1
            return (0 if index >= len(nodes) else index), [str(k) for k in keys]
        return (int(next_cursor) << 8) | index, [str(k) for k in keys]

    def _ensure_notifications_sync(self) -> NotificationStatus:
        # Every resynchronisation starts here: refresh the topology first.
        self._client.nodes_manager.initialize()
        self._load_scripts_sync()
        return self._verify_notifications_sync()

    def _verify_notifications_sync(self) -> NotificationStatus:
        nodes = self._client.get_nodes()  # replicas too: they may be promoted
        statuses = [ensure_on(self._client.get_redis_connection(node)) for node in nodes]
        known, self._flagged = (
            self._flagged,
            {node.name for node, s in zip(nodes, statuses, strict=True) if s.ok},
        )
        # CLUSTER SLOTS lists a replica only once the cluster knows it is in sync, so
        # one may first show up seconds after start: setting its flags then restores
        # nothing (replicas publish nothing the leader listens to). A change counts on a
        # node already verified, or on a primary.
        changed = [
            s
            for node, s in zip(nodes, statuses, strict=True)
            if s.changed and (node.name in known or node.server_type == "primary")
        ]
        bad = [s for s in statuses if not s.ok]
        # Report the node that needs attention: one that refused, else one just set.
        first = bad[0] if bad else changed[0] if changed else statuses[0]
        return NotificationStatus(
            ok=not bad,
            flags=first.flags,
            changed=bool(changed),
            missing=first.missing,
            error=first.error,
        )

    async def listen(
        self,
        *,
        patterns: list[str],
        channels: list[str],
        send: trio.MemorySendChannel[list[Message]],
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keyspace patterns on every primary; channels (cluster-wide) on one node. Raises
        RedisUnavailable when a connection drops or the set of primaries changes.

        Claim markers are not subscribed: a key's events come from its own node and a
        marker from the worker's, in no common order. Started with the earliest of the
        primaries' times read before subscribing."""
        primaries = await self._run(self._fresh_primaries)
        # Channels are broadcast to every node: one subscription is enough for them.
        clients = [self._node_client(node) for node in (primaries if patterns else primaries[:1])]
        channels = [c for c in channels if c != self.keys.claims]
        try:
            async with trio.open_nursery() as nursery:
                since = [
                    await nursery.start(
                        self._listen_on, client, patterns, channels if i == 0 else [], send
                    )
                    for i, client in enumerate(clients)
                ]
                task_status.started(min(since))
                if patterns:
                    nursery.start_soon(self._watch_topology, {n.name for n in primaries})
        finally:
            for client in clients:
                client.close()

    def _pubsub_client(self) -> Any:
        return self._node_client(self._primaries()[0])

    def _node_client(self, node: Any) -> redis.Redis:
        kwargs = client_kwargs(self._config)
        del kwargs["db"]
        return redis.Redis(host=node.host, port=node.port, **kwargs)

    async def _watch_topology(self, names: set[str]) -> None:
        while True:
            await trio.sleep(_TOPOLOGY_EVERY)
            if await self._run(self._current_primaries) != names:
                raise RedisUnavailable("Redis Cluster topology changed: resubscribing")

    def _current_primaries(self) -> set[str]:
        nodes: Any = self._client.cluster_nodes()
        return {
            addr.split("@")[0]
            for addr, info in nodes.items()
            if "master" in info["flags"]
            and "fail" not in info["flags"]
            and info.get("connected", True)
        }
