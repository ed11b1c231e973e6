"""The ``.env`` file: read strictly, since a line skipped in silence is a setting lost.

Messages never quote a line of the file: it may hold a secret.
"""

from __future__ import annotations

import io
from pathlib import Path

from dotenv import dotenv_values
from dotenv.parser import parse_stream

from .errors import ConfigError
from .setting import one_line, shown

__all__ = ["env_file_exists", "no_env_file_hint", "read_env_file"]


def read_env_file(path: Path) -> dict[str, str]:
    """The settings in a ``.env`` file; ConfigError if it cannot be read or parsed.

    Read here rather than by python-dotenv, which would log a warning for a line it
    cannot parse and skip it, and raise a bare UnicodeDecodeError for a file in another
    encoding."""
    where = shown(str(_absolute(path)))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"env file {where} is not UTF-8 text (line {line} has byte "
            f"0x{exc.object[exc.start]:02x}): save it as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"env file {where} cannot be read: {one_line(exc.strerror or str(exc))}"
        ) from None
    for binding in parse_stream(io.StringIO(text)):
        if binding.error:
            raise ConfigError(
                f"env file {where} line {binding.original.line} is not NAME=value (nor a "
                "# comment): fix or remove that line"
            )
    values = dotenv_values(stream=io.StringIO(text))
    return {k: v for k, v in values.items() if v is not None}


def env_file_exists(path: Path) -> bool:
    """Path.exists, except that a path too long to look up counts as there, so that
    reading it gives the error."""
    try:
        return path.exists()
    except OSError:
        return True


def _absolute(path: Path) -> Path:
    try:
        return path.absolute()
    except OSError:  # the working directory is gone
        return path


def no_env_file_hint(path: Path) -> str:
    """For "X is required": where the settings were looked for."""
    where = _absolute(path)
    found = f"no .env file in {where.parent}" if path.name == ".env" else f"no file {where}"
    return f" ({found}; pass --env-file or set the environment)"
