"""Errors a user can fix, and the one-line form the CLI prints them in. Imports nothing from dsum."""

from __future__ import annotations


class DsumError(Exception):
    """An error the user can fix; the CLI prints it as one line, without a traceback."""


class ConfigError(DsumError):
    """A job file or override that is not a valid job."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message folded onto one short line, for `dsum: error: ...`."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
