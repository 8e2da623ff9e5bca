"""Typed errors. Each also subclasses the built-in it resembles, so callers may catch either."""

from __future__ import annotations


class DtrakError(Exception):
    """Base class of every error dtrak-ray raises on purpose."""


class ConfigError(DtrakError, ValueError):
    """The experiment config is invalid; the message names the field and the fix."""


class MissingArtifactError(DtrakError, FileNotFoundError):
    """A stage needs an artifact that an earlier stage has not written."""


class RunConflictError(DtrakError, ValueError):
    """A run exists in the store with a different config than the one given."""


class StoreError(DtrakError, OSError):
    """The store cannot be reached or written."""


class CorruptArtifactError(DtrakError, ValueError):
    """A stored artifact exists but cannot be read back (truncated, overwritten, or not what its key says)."""


class ProvenanceError(DtrakError, ValueError):
    """Arrays about to be combined were made differently (projector, seed, k, K, model, ...); the message names each field."""
