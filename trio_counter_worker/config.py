"""Settings: one frozen class, built from the environment and an optional ``.env`` file.

Each setting is declared once, on the :class:`Config` field it fills: the field holds the
default and the validators, a :class:`Setting` in its metadata the variable's name, help
text, parser and secrecy (see :mod:`~trio_counter_worker.setting`). ``SETTINGS``, the
loader, ``--help``, the README check and the error messages all read that one
declaration. The fields are declared by concern, each group in a module of its own
(``config_delivery.py``, ``config_redis.py``, ``config_election.py``,
``config_observability.py``); :class:`Config` takes them all over, flat, and orders them.
Validation happens on construction, and checks everything that could otherwise fail later
(a secret that cannot be sent as a header, a URL httpx refuses, a COUNTER_KEY that would
match the worker's own keys); a bad value raises :class:`ConfigError` with a one-line
message naming the variable and what was expected. Values of secret settings never
appear in messages or reprs.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from .config_delivery import DeliverySettings
from .config_election import ElectionSettings
from .config_observability import ObservabilitySettings
from .config_redis import RedisSettings
from .env_file import env_file_exists, no_env_file_hint, read_env_file
from .errors import ConfigError
from .glob import may_match_prefix
from .keys import OWN_KEY_PREFIX, Keys
from .setting import (
    Setting,
    complete_settings,
    env_fields,
    env_var,
    non_empty,
    setting_of,
    shown,
    utf8,
)

__all__ = ["OWN_KEY_PREFIX", "SETTINGS", "Config", "Setting"]

_UNUSED_URL = "https://reset-endpoint.invalid/"  # .invalid: can never resolve (RFC 6761)
_UNUSED_SECRET = "unused"  # noqa: S105 - a placeholder, never sent

# Config's fields in the order of SETTINGS, --help and the README's table (and the repr).
# The groups interleave here, so the order is stated once, apart from them.
_ORDER = (
    "reset_endpoint_url",
    "reset_secret",
    "counter_key",
    "redis_host",
    "redis_port",
    "redis_password",
    "redis_db",
    "redis_username",
    "redis_tls",
    "redis_cluster_nodes",
    "redis_sentinels",
    "redis_sentinel_master",
    "redis_sentinel_password",
    "lease_ttl_ms",
    "takeover_check_ms",
    "replica_id",
    "reset_timeout_ms",
    "max_in_flight",
    "reset_give_up_after",
    "log_level",
    "log_format",
    "log_resets",
    "reset_signing_secret",
    "allow_insecure_http",
    "health_port",
    "health_host",
    "redis_ca_file",
    "overridden",
    "notices",
)


def _in_order(cls: type, fields: list[attrs.Attribute[Any]]) -> list[attrs.Attribute[Any]]:
    """attrs field transformer of Config: every field, its own and its groups', completed
    (see ``complete_settings``) and in the order of ``_ORDER``."""
    by_name = {field.name: field for field in complete_settings(cls, fields)}
    if by_name.keys() != set(_ORDER):
        unplaced = sorted(by_name.keys() ^ set(_ORDER))
        raise TypeError(f"_ORDER must name each field of Config once; check {unplaced}")
    return [by_name[name] for name in _ORDER]


def _counter_key(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    # Reconcile and the event subscription would take the lease, the deadlines and the
    # release channel (of this or another deployment) for counters.
    if may_match_prefix(value, OWN_KEY_PREFIX):
        raise ConfigError(
            f"{setting_of(attribute).name} {shown(value)} could match the worker's own keys, "
            f"which all start with {OWN_KEY_PREFIX!r}: start it with a literal prefix of your "
            "own, like 'counter:*'"
        )


# slots=False, as in the groups: Python refuses a class two of whose bases have slots.
@attrs.frozen(kw_only=True, slots=False, field_transformer=_in_order)
class Config(DeliverySettings, RedisSettings, ElectionSettings, ObservabilitySettings):
    """Validated settings of one replica. Build it with :meth:`from_env` or directly.

    Its fields are its groups' and its own, all flat (``config.redis_host``). A field
    filled from the environment declares its variable in its metadata; the fields' order,
    that of ``_ORDER``, is that of ``SETTINGS``, ``--help`` and the README's table.
    """

    counter_key: str = attrs.field(
        default="contador_reset",
        validator=[non_empty, utf8, _counter_key],
        metadata=env_var(
            "COUNTER_KEY",
            "key, or glob pattern such as counter:*, whose expiry "
            "means inactivity; must not be able to match the worker's own tcw:{ keys",
            expects="the key (or glob pattern) the app sets",
        ),
    )
    # Where the settings came from, not what they are (so not part of equality): the
    # REDIS_* settings that were set but lost to REDIS_URL, for a warning at start.
    overridden: tuple[str, ...] = attrs.field(default=(), eq=False)
    # Names in the .env file that are no setting, and environment variables a typo away
    # from one: a warning each at start and in `check` (see ``misnamed``).
    notices: tuple[str, ...] = attrs.field(default=(), eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self._check_topology()
        self._check_transport()

    @property
    def keys(self) -> Keys:
        """The deployment's own Redis keys and channels."""
        return Keys(self.counter_key)

    @property
    def namespace(self) -> str:
        """Prefix of the worker's own Redis keys (:attr:`Keys.namespace`)."""
        return self.keys.namespace

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        env_file: str | Path | None = ".env",
        required_file: bool = False,
        redis_only: bool = False,
    ) -> Config:
        """Read settings from ``environ`` (default ``os.environ``) over ``env_file``.

        The real environment wins over the file. A missing ``env_file`` is not an error
        unless ``required_file`` (it was named on purpose, as with ``--env-file``); a file
        that cannot be read, is not UTF-8 or has a line that is not ``NAME=value`` is.

        ``redis_only`` is for commands that only read Redis (``status``): the settings of
        reset delivery (RESET_*, MAX_IN_FLIGHT, ALLOW_INSECURE_HTTP) are ignored and the
        endpoint and secret hold placeholders, so such a Config must not run a worker.
        """
        values: dict[str, str] = {}
        hint = ""
        environ = os.environ if environ is None else environ
        notices: tuple[str, ...] = ()
        if env_file is not None:
            path = Path(env_file)
            if env_file_exists(path):
                values.update(read_env_file(path))
                notices = misnamed(values, str(path))
            elif required_file:
                raise ConfigError(f"--env-file {shown(str(path))}: no such file")
            else:
                hint = no_env_file_hint(path)
        notices += misnamed(environ)
        values.update(environ)
        if redis_only:
            values = {k: v for k, v in values.items() if k not in _DELIVERY_SETTINGS}
            values.update(RESET_ENDPOINT_URL=_UNUSED_URL, RESET_SECRET=_UNUSED_SECRET)
        return cls._from_mapping(values, hint, notices)

    @classmethod
    def _from_mapping(
        cls, env: Mapping[str, str], hint: str = "", notices: tuple[str, ...] = ()
    ) -> Config:
        """Each field's variable through its parser; unset or blank leaves the default."""
        kwargs: dict[str, Any] = {}
        spread: dict[str, Any] = {}
        for field, setting in env_fields(cls):
            raw = env.get(setting.name, "").strip()
            if not raw:
                if setting.required:
                    raise ConfigError(
                        f"{setting.name} is required: set it to {setting.expects}{hint}"
                    )
            elif setting.spread:
                spread = setting.parse(setting, raw)
            else:
                kwargs[field.name] = setting.parse(setting, raw)
        if spread:  # REDIS_URL wins over the settings it holds too: name those that were set
            lost = spread.keys() & kwargs.keys()
            kwargs["overridden"] = tuple(s.name for f, s in env_fields(cls) if f.name in lost)
            kwargs.update(spread)
        return cls(**kwargs, notices=notices)


SETTINGS: tuple[Setting, ...] = tuple(setting for _, setting in env_fields(Config))
_DELIVERY_SETTINGS = frozenset(s.name for s in SETTINGS if s.delivery)
_NAMES = [s.name for s in SETTINGS]
_CLOSE = 0.8  # difflib ratio: LEASE_TLL_MS, REDIS_PASS; not REDIS_SERVICE_HOST (Kubernetes)


def misnamed(names: Iterable[str], env_file: str | None = None) -> tuple[str, ...]:
    """A warning for each name that is no setting: every such name of ``env_file`` (all
    its names are meant for the worker), and of the environment only those close to a
    setting's name (it holds PATH, HOME and the like too). Names only: never a value."""
    out = []
    for name in names:
        if name in _NAMES:
            continue
        name_shown = shown(name)
        close = difflib.get_close_matches(name.upper(), _NAMES, n=1, cutoff=_CLOSE)
        if env_file is not None:
            guess = close or difflib.get_close_matches(name.upper(), _NAMES, n=1)
            advice = f"did you mean {guess[0]}?" if guess else "`--help` lists the settings"
            out.append(
                f"{shown(env_file)} sets {name_shown}, which is no setting ({advice}); ignored"
            )
        elif close:
            out.append(
                f"environment variable {name_shown} is no setting "
                f"(did you mean {close[0]}?); ignored"
            )
    return tuple(out)
