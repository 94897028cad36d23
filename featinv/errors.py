"""featinv's exception hierarchy.

Every error a user can cause is a :class:`FeatinvError`; the CLI prints it as
one line and exits non-zero.  Messages name the file or parameter, the bad
value and the fix.  ``assert`` is reserved for internal invariants.
"""

from __future__ import annotations

__all__ = [
    "FeatinvError",
    "ParamsError",
    "UnknownNameError",
    "BadImageError",
    "DataSourceError",
    "StoreMismatchError",
    "StoreIncompleteError",
    "WeightsUnavailableError",
    "DownloadError",
    "CheckpointError",
    "StorageError",
]


class FeatinvError(Exception):
    """Base class of every error featinv raises on purpose."""


class ParamsError(FeatinvError, ValueError):
    """A parameter (params.yaml key, CLI option) is missing, mistyped or out of range."""


class UnknownNameError(FeatinvError, KeyError):
    """A registry lookup failed; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class BadImageError(FeatinvError):
    """An input image cannot be read or used (corrupt, not an image, too small)."""


class DataSourceError(FeatinvError):
    """A data source is empty, missing or inconsistent."""


class StoreMismatchError(FeatinvError):
    """A feature store's fingerprint does not match what the caller asked for."""


class StoreIncompleteError(FeatinvError):
    """A feature or image store is missing, partial or not a featinv store."""


class WeightsUnavailableError(FeatinvError):
    """Pretrained weights cannot be loaded (offline, missing file)."""


class DownloadError(FeatinvError):
    """A download failed or its result did not verify."""


class CheckpointError(FeatinvError):
    """A checkpoint is missing, unreadable or inconsistent."""


class StorageError(FeatinvError):
    """Writing an output failed (disk full, permission denied, read-only filesystem); the path is named."""
