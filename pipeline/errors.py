"""Exceptions whose message tells the user what to do."""
from __future__ import annotations


class FreezeframeError(Exception):
    """Base class: a problem the user can fix; the CLI prints it without a traceback."""


class ManifestError(FreezeframeError):
    """A manifest (or the annotation files it was built from) is invalid.

    ``problems`` lists every problem found, not only the first.
    """

    def __init__(self, summary: str, problems: list[str] | None = None) -> None:
        self.problems = list(problems or [])
        lines = [summary] + [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class ConfigMismatchError(FreezeframeError):
    """A run's config does not match an existing store or checkpoint."""


class StoreError(FreezeframeError):
    """A feature store is missing, incomplete or inconsistent."""


class WeightsError(FreezeframeError):
    """Backbone weights cannot be found or do not verify."""


class ConfigError(FreezeframeError, ValueError):
    """A config file or ``--set key=value`` override is malformed or names an unknown key."""
