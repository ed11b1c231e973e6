"""One setting: its declaration on a Config field, and the parsers and checks shared by many.

A field filled from the environment carries a :class:`Setting` in its metadata
(``metadata=env_var(...)``): the variable's name, help text, parser and secrecy; the
field itself holds the default and the validators. Parsers turn the variable's text into
the field's value, validators check the value; both raise :class:`ConfigError` with a
one-line message naming the variable and what was expected, and never show the value of
a secret setting. Checks that only one group of settings needs live with that group
(``config_redis.py``, ``config_delivery.py``, ...).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any, cast

import attrs

from .errors import ConfigError

__all__ = [
    "HIDDEN",
    "Setting",
    "boolean",
    "complete_settings",
    "duration",
    "env_fields",
    "env_var",
    "host_or_ip",
    "host_problem",
    "int_in",
    "integer",
    "is_ip",
    "is_utf8",
    "lower",
    "non_empty",
    "one_line",
    "one_of",
    "setting_of",
    "shown",
    "upper",
    "utf8",
]

HIDDEN = "(value hidden)"
_SHOWN_MAX = 100  # longer values are cut short in messages
_INTEGER = re.compile(r"[-+]?[0-9]+")
_DURATION = re.compile(r"([0-9]{1,9})(s|m|h|d)")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_SETTING = "trio_counter_worker.setting"  # the field metadata key of a Setting


def shown(value: str) -> str:
    """A value for a message: ``repr`` (one line, control characters escaped), cut short."""
    if len(value) <= _SHOWN_MAX:
        return repr(value)
    return f"{value[:_SHOWN_MAX]!r}... ({len(value)} characters)"


def _shown_number(value: int) -> str:
    digits = str(value)
    return digits if len(digits) <= 20 else f"{digits[:20]}... ({len(digits)} digits)"


def one_line(text: str) -> str:
    """An error text from elsewhere, on one line."""
    return " ".join(text.split())


def is_utf8(value: str) -> bool:
    """False if ``value`` holds lone surrogates: on Linux, ``os.environ`` decodes bytes that
    are not UTF-8 that way, and every later ``encode()`` of them fails."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def host_problem(host: str) -> str | None:
    """What is wrong with ``host`` as a host name or IP address, as the rest of a sentence
    that starts with the variable's name; None if nothing. The test is what connecting
    needs: ``socket.getaddrinfo`` encodes names with the idna codec."""
    text = shown(host)
    if not host:
        return "must be a host name or IP address, got ''"
    if not host.isprintable() or any(c.isspace() for c in host):
        return (
            f"must be a host name or IP address, without spaces or control characters, got {text}"
        )
    if not is_ip(host):
        try:
            host.encode("idna")
        except UnicodeError as exc:
            reason = one_line(str(exc.__cause__ or exc))
            return (
                f"is not a valid host name ({reason}; each dot-separated part has 1-63 "
                f"characters), got {text}"
            )
    return None


# --- parsers: (the setting, its stripped and non-blank text) -> the field's value ---------


def _text(_setting: Setting, raw: str) -> str:
    return raw


def upper(_setting: Setting, raw: str) -> str:
    return raw.upper()


def lower(_setting: Setting, raw: str) -> str:
    return raw.lower()


def integer(setting: Setting, raw: str) -> int:
    try:
        if _INTEGER.fullmatch(raw):
            return int(raw)
    except ValueError:  # more digits than int() takes
        pass
    text = HIDDEN if setting.secret else shown(raw)
    raise ConfigError(f"{setting.name} must be a whole number, got {text}")


def boolean(setting: Setting, raw: str) -> bool:
    raw = raw.lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ConfigError(f"{setting.name} must be 1 or 0 (true/false, yes/no), got {shown(raw)}")


def duration(setting: Setting, raw: str) -> float:
    """``90s``, ``30m``, ``6h``, ``2d`` (at least 1 s) into seconds."""
    match = _DURATION.fullmatch(raw.lower())
    if match is None or int(match[1]) == 0:
        raise ConfigError(
            f"{setting.name} must be a duration such as 90s, 30m, 6h or 2d, got {shown(raw)}"
        )
    return float(int(match[1]) * _UNIT_SECONDS[match[2]])


@attrs.frozen
class Setting:
    """One environment variable. Declared with ``env_var`` in the metadata of the
    :class:`~trio_counter_worker.config.Config` field it fills; ``required`` and
    ``default`` are then taken from that field, so ``SETTINGS`` shows what the class
    really does."""

    name: str
    help: str
    parse: Callable[[Setting, str], Any] = attrs.field(default=_text, repr=False)
    secret: bool = False  # never shown: not in messages, not in the repr
    delivery: bool = False  # only sending resets uses it: `status` and `redeliver` ignore it
    expects: str = ""  # what to set it to, for "is required" and "must not be empty"
    spread: bool = False  # ``parse`` gives the values of several fields, by name
    # As --help and the README show it; None: no default. Declared only where the field's
    # own default cannot say it: a factory, or a None that stands for "never" or "the system's".
    default: str | None = None
    required: bool = False


def env_var(name: str, help: str, **options: Any) -> dict[str, Setting]:
    """Field metadata: the field is filled from the variable ``name`` (see Setting)."""
    return {_SETTING: Setting(name, help, **options)}


def setting_of(attribute: attrs.Attribute[Any]) -> Setting:
    """The Setting of a field that a variable fills."""
    return cast(Setting, attribute.metadata[_SETTING])


def env_fields(cls: type) -> list[tuple[attrs.Attribute[Any], Setting]]:
    """The fields of the attrs class ``cls`` that variables fill, with their Settings."""
    return [(field, setting_of(field)) for field in attrs.fields(cls) if _SETTING in field.metadata]


def _shown_default(value: object) -> str | None:
    """A field default as the environment would spell it; None for "unset"."""
    if value is attrs.NOTHING or value is None or value == ():
        return None
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def complete_settings(_cls: type, fields: list[attrs.Attribute[Any]]) -> list[attrs.Attribute[Any]]:
    """attrs field transformer: each field's Setting learns its default from the field,
    and a secret field stays out of the repr."""
    return [_complete(field) if _SETTING in field.metadata else field for field in fields]


def _complete(field: attrs.Attribute[Any]) -> attrs.Attribute[Any]:
    setting = setting_of(field)
    setting = attrs.evolve(
        setting,
        required=field.default is attrs.NOTHING,
        default=setting.default or _shown_default(field.default),
    )
    # A spread setting's other fields are parts of it with their own secrecy (REDIS_URL's
    # password is secret, its user name is not).
    visible = field.repr and not (setting.secret and not setting.spread)
    return field.evolve(metadata={**field.metadata, _SETTING: setting}, repr=visible)


# --- validators: each message names the variable, from the field's Setting -------------


def int_in(lo: int, hi: int, unit: str = "") -> Any:
    """attrs validator: None, or an int within [lo, hi]."""

    def check(_inst: object, attribute: attrs.Attribute[Any], value: int | None) -> None:
        if value is not None and not lo <= value <= hi:
            raise ConfigError(
                f"{setting_of(attribute).name} must be between {lo} and {hi}{unit}, "
                f"got {_shown_number(value)}"
            )

    return check


def one_of(choices: tuple[str, ...]) -> Any:
    def check(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
        if value not in choices:
            raise ConfigError(
                f"{setting_of(attribute).name} must be one of {', '.join(choices)}, "
                f"got {shown(value)}"
            )

    return check


def non_empty(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if not value.strip():
        setting = setting_of(attribute)
        raise ConfigError(f"{setting.name} must not be empty: set it to {setting.expects}")


def utf8(_inst: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    """Text that can be sent (None passes)."""
    if value is not None and not is_utf8(value):
        setting = setting_of(attribute)
        text = HIDDEN if setting.secret else f"got {shown(value)}"
        raise ConfigError(
            f"{setting.name} must be valid UTF-8 text, but holds bytes that are not (a file or "
            f"shell in another encoding?): {text}"
        )


def host_or_ip(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if (problem := host_problem(value)) is not None:
        raise ConfigError(f"{setting_of(attribute).name} {problem}")
